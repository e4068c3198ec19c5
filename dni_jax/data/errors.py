"""The one error type of dni_jax.data (its own module: every reader raises it)."""


class DataError(ValueError):
  """Data cannot be found or read; the one-line message names the file and how to get the data."""

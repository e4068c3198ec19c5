"""The numbers the fidelity experiments report: cosines between a gradient
signal and the true gradient, and statistics over seeds."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def per_example_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """f32[B]: the cosine of a[i] and b[i], each flattened ([B, ...] arrays)."""
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, 1e-30)


def pooled_cosine(a: Any, b: Any) -> jax.Array:
  """The cosine of two pytrees of the same structure, all leaves flattened
  into one vector each (examples weighted by their gradient norms)."""
  a = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a)])
  b = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b)])
  return jnp.sum(a * b) / jnp.maximum(
      jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)


def cosines(predicted: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
  """Cosine of the flattened batch, and the mean of per-example cosines."""
  p = predicted.reshape(predicted.shape[0], -1)
  t = true.reshape(true.shape[0], -1)
  flat = jnp.sum(p * t) / jnp.maximum(
      jnp.linalg.norm(p) * jnp.linalg.norm(t), 1e-30)
  return {'batch': flat, 'per_example': jnp.mean(per_example_cosine(p, t))}


def mean_spread(values: list[float]) -> dict[str, float]:
  """Mean, min, max and std of scalars (one per seed), and their number."""
  a = np.asarray(values, np.float64)
  return {'mean': round(float(a.mean()), 5),
          'min': round(float(a.min()), 5), 'max': round(float(a.max()), 5),
          'std': round(float(a.std()), 5), 'n': int(a.size)}


def seed_stats(values) -> dict:
  """Mean, std, min and max over the first axis (seeds), elementwise."""
  v = np.asarray(values, np.float64)
  return {'mean': np.round(v.mean(0), 4).tolist(),
          'std': np.round(v.std(0), 4).tolist(),
          'min': np.round(v.min(0), 4).tolist(),
          'max': np.round(v.max(0), 4).tolist()}

"""What every absl script of this package does with bad input.

A bad flag, file or run ends the script with one line, `PROG: error: ...`,
on stderr and exit code 1 (never a traceback); stray positional arguments
are a usage error.
"""

import contextlib
import sys
from typing import Iterator, NoReturn, Sequence

from absl import app

from dni_jax import training

# DataError, WorkdirError and bad settings are ValueErrors; a run that goes
# wrong (non-finite loss, ...) raises TrainingError.
ERRORS = (ValueError, training.TrainingError)


@contextlib.contextmanager
def one_line_errors(prog: str,
                    extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
  """Turns ERRORS (and `extra`) raised in the block into `prog: error: ...`
  on stderr and exit code 1."""
  try:
    yield
  except ERRORS + extra as e:
    fail(prog, str(e))


def fail(prog: str, message: str) -> NoReturn:
  """Ends the script: `prog: error: message` on stderr, exit code 1."""
  print(f'{prog}: error: {message}', file=sys.stderr)
  sys.exit(1)


def no_positional_arguments(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')

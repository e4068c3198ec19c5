"""What every absl script of this package does with bad input.

A bad flag, file or run ends the script with one line, `PROG: error: ...`,
on stderr and exit code 1 (never a traceback); so do stray positional
arguments, a file the script cannot write (a full disk, a read-only
filesystem) and Ctrl-C before the training loop takes over the signal (exit
code 130, no traceback, no crash of the compiler threads at exit).
"""

import contextlib
import dataclasses
import os
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import flags

from dni_jax import training

# DataError, WorkdirError and bad settings are ValueErrors; a run that goes
# wrong (non-finite loss, ...) raises TrainingError.
ERRORS = (ValueError, training.TrainingError)
INTERRUPTED_EXIT_CODE = 130   # 128 + SIGINT, as shells report it.


@contextlib.contextmanager
def one_line_errors(prog: str,
                    extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
  """Turns ERRORS (and `extra`) raised in the block into `prog: error: ...`
  on stderr and exit code 1; an OSError into its path and reason; Ctrl-C
  (KeyboardInterrupt) into one line and exit code 130."""
  try:
    yield
  except ERRORS + extra as e:
    fail(prog, str(e))
  except OSError as e:
    fail(prog, training.describe_os_error(e))
  except KeyboardInterrupt:
    interrupted(prog)


def fail(prog: str, message: str) -> NoReturn:
  """Ends the script: `prog: error: message` on stderr, exit code 1."""
  print(f'{prog}: error: {message}', file=sys.stderr)
  sys.exit(1)


def interrupted(prog: str) -> NoReturn:
  """Ends the script after Ctrl-C outside the training loop (loading data,
  compiling): one line and exit code 130. `os._exit`, since XLA's compiler
  threads may still run and crash an orderly interpreter shutdown; every
  file the script writes is written atomically, so none is left half
  written (a resumable run resumes from its last checkpoint)."""
  print(f'{prog}: error: interrupted (Ctrl-C) before training started; '
        'rerun the same command to start or resume', file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access


def no_positional_arguments(argv: Sequence[str]) -> None:
  """Ends the script with one line (not absl's page of help) if `argv`
  holds positional arguments; flags are written --name=value."""
  if len(argv) > 1:
    fail(os.path.basename(argv[0]),
         f'unexpected argument(s): {" ".join(argv[1:])} (flags are written '
         '--name=value; see --help)')


def experiment_from_flags(experiment: type, flag_values: Any,
                          convert: dict[str, Callable[[str, Any], Any]]
                          | None = None) -> Any:
  """An experiment dataclass built from the flags of its fields' names (each
  field is one flag, declared with the field's default); `convert` maps a
  field to `fn(flag, value)` for a flag whose value is not the field's (a
  comma-separated list, say)."""
  convert = convert or {}
  kwargs = {}
  for field in dataclasses.fields(experiment):
    value = flag_values[field.name].value
    if field.name in convert:
      value = convert[field.name](field.name, value)
    kwargs[field.name] = value
  return experiment(**kwargs)


def define_workdir_flags() -> None:
  """--workdir and --overwrite, the same in every training script."""
  flags.DEFINE_string('workdir', None, 'Output directory (required).')
  flags.DEFINE_bool('overwrite', False,
                    'Start again in a workdir that holds a run of this '
                    'project and nothing else (its run entries are deleted '
                    'once flags and data are valid; a folder with other '
                    'files is refused).')

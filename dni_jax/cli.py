"""What every absl script of this package does with bad input.

A bad flag, file or run ends the script with one line, `PROG: error: ...`,
on stderr and exit code 1 (never a traceback); so do stray positional
arguments, a file the script cannot write (a full disk, a read-only
filesystem) and Ctrl-C before the training loop takes over the signal (exit
code 130, no traceback, no crash of the compiler threads at exit).
"""

import contextlib
import difflib
import os
import re
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import flags
from absl import logging

from dni_jax import settings
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


@contextlib.contextmanager
def flag_errors(prog: str, config_flag: str | None = None) -> Iterator[None]:
  """A bad flag value raised in the block ends the script with one line; so
  does, with `config_flag`, any error of loading that flag's config file
  (config_flags lets the file's own errors through)."""
  try:
    yield
  except flags.Error as e:
    fail(prog, _one_line(str(e)))
  except Exception as e:  # pylint: disable=broad-except
    if config_flag is None:
      raise
    fail(prog, f'--{config_flag}: {_one_line(str(e))}')


def _one_line(message: str) -> str:
  """`message` on one line; of a traceback in it (config_flags quotes the
  config file's), only the exception."""
  head, traceback, rest = message.partition(
      'Traceback (most recent call last):')
  if traceback:
    message = head + rest.strip().splitlines()[-1]
  return ' '.join(message.split())


def flags_parser(prog: str, config_flag: str | None = None
                 ) -> Callable[[list[str]], list[str]]:
  """`app.run`'s flags_parser: `flag_errors` around absl's parsing."""
  def parse(argv: list[str]) -> list[str]:
    with flag_errors(prog, config_flag):
      return flags.FLAGS(argv)
  return parse


def check_config_overrides(prog: str, config_flag: str,
                           paths: Sequence[str],
                           argv: Sequence[str] | None = None) -> None:
  """Ends the script with one line if `argv` (default: sys.argv) overrides
  --CONFIG_FLAG.PATH for a PATH not in `paths`: a misspelt setting, which
  config_flags would report with a traceback."""
  argv = sys.argv if argv is None else argv
  for arg in argv[1:]:
    match = re.match(rf'^--?(?:no)?{config_flag}\.([^=]*)', arg)
    if match and match.group(1) not in paths:
      close = difflib.get_close_matches(match.group(1), paths, n=1)
      fail(prog, f'--{config_flag}.{match.group(1)}: no such setting' + (
          f' (did you mean --{config_flag}.{close[0]}?)' if close else ''))


def define_workdir_flags() -> None:
  """--workdir and --overwrite, the same in every training script."""
  flags.DEFINE_string('workdir', None, 'Output directory (required).')
  flags.DEFINE_bool('overwrite', False,
                    'Start again in a workdir that holds a run of this '
                    'project and nothing else (its run entries are deleted '
                    'once flags and data are valid; a folder with other '
                    'files is refused).')


def experiment_from_flags(experiment: type,
                          flag_values: flags.FlagValues = flags.FLAGS,
                          config_flag: str | None = None) -> Any:
  """An experiment dataclass built from --workdir, --overwrite and the flags
  of its settings' names (`settings.define_flags`); with `config_flag`, from
  that flag's config, the flags given on the command line replacing its
  values."""
  fixed = dict(workdir=flag_values.workdir, overwrite=flag_values.overwrite)
  if config_flag is None:
    return settings.from_flags(experiment, flag_values, **fixed)
  try:   # config_flags defers a file's failure to load to its first use.
    config = flag_values[config_flag].value
    config.keys()
  except OSError as e:
    raise ValueError(f'--{config_flag}: {_one_line(str(e))}') from None
  return settings.from_config_and_flags(experiment, config, flag_values,
                                        config_flag, **fixed)


def script_main(prog: str, run: Callable[[], Any]
                ) -> Callable[[list[str]], None]:
  """The absl main of a script that is not a training run: no positional
  arguments, `run()` (which reads the parsed flags), bad input in one line."""
  def main(argv: list[str]) -> None:
    no_positional_arguments(argv)
    with one_line_errors(prog):
      run()
  return main


def training_main(prog: str, experiment: type,
                  train: Callable[[Any], dict],
                  summary: Callable[[Any, dict], str],
                  config_flag: str | None = None
                  ) -> Callable[[list[str]], None]:
  """The absl main of every training script: the experiment from its flags
  (`experiment_from_flags`), `train(exp)` -> result.json's dict, and the
  one-line `summary(exp, result)` on stdout; bad input in one line. Run it
  with `app.run(main, flags_parser=flags_parser(prog, config_flag))`."""
  def main(argv: list[str]) -> None:
    no_positional_arguments(argv)
    with one_line_errors(prog):
      exp = experiment_from_flags(experiment, config_flag=config_flag)
      result = train(exp)
    logging.info('result: %s', result)
    print(summary(exp, result))
  return main

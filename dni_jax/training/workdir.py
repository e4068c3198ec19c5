"""The run harness every script shares (`open_workdir`, then `train`): the
workdir contract, restore, the loop, metrics, result, health checks.

A workdir holds
  config.json     every flag value of the run;
  metrics.jsonl   one JSON object per evaluation, each with `step`;
  result.json     the final summary, written last and atomically: its presence
                  means the run finished;
  checkpoints/    orbax step folders (atomic, the last few kept);
  checkpoints_unreadable/  checkpoints that failed to restore, moved aside;
  tensorboard/    the metrics as TensorBoard scalars;
and nothing else: `RUN_ENTRIES` (with the `.tmp` files of atomic writes) is
everything a run writes there, and anything else is foreign.

Re-running the same command on the same workdir resumes from the latest good
checkpoint; data order depends only on (seed, step), so a resumed run sees the
same batches as an uninterrupted one. A rerun may change the settings that do
not change what is computed (`RESUMABLE`: where the workdir is, how often the
loop logs, evaluates and checkpoints) and raise --num_steps (the run is
extended; the learning-rate schedule is in absolute steps and is part of the
config); any other difference is refused. `--overwrite` replaces only a
folder that holds a run and nothing foreign.
"""

import json
import os
import shutil
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils

from dni_jax import tensorboard_log

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
RESULT_FILE = 'result.json'
CHECKPOINT_DIR = 'checkpoints'
TENSORBOARD_DIR = tensorboard_log.TENSORBOARD_DIR   # metrics.jsonl's view.
UNREADABLE_DIR = 'checkpoints_unreadable'
# Everything a run writes directly under its workdir.
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, RESULT_FILE, CHECKPOINT_DIR,
               UNREADABLE_DIR, tensorboard_log.TENSORBOARD_DIR) + tuple(
                   f'{name}.tmp' for name in (CONFIG_FILE, METRICS_FILE,
                                              RESULT_FILE))
# Settings a rerun may change without changing what the run computes: where
# the workdir is and how often the loop logs, evaluates and checkpoints
# (`--num_steps` may grow: see `check_workdir`). Recurrent runs keep
# `eval_every` fixed: their evaluations drive the curriculum and early stop.
RESUMABLE = ('workdir', 'log_every', 'eval_every', 'checkpoint_every')
# Settings holding paths: compared after normalisation (absolute, symlinks
# resolved, no trailing slash).
PATH_SETTINGS = ('data_dir',)



def normalise_path(path: str | None) -> str | None:
  """One spelling of a folder: absolute, symlinks resolved, no trailing
  slash (None stays None)."""
  return None if path is None else os.path.realpath(os.path.expanduser(path))



class WorkdirError(ValueError):
  """The workdir cannot be used as asked (another run's, or unreadable)."""


class TrainingError(RuntimeError):
  """Training cannot go on (for example a non-finite loss)."""


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------

def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        # Only a line cut by a kill can be partial: it is the last one.
        logging.warning('%s line %d is incomplete; dropped', path, n)
  return rows


def describe_os_error(e: OSError) -> str:
  """`path: reason` of an OSError, in words (a full disk, a read-only
  filesystem, a missing permission)."""
  reason = e.strerror or str(e)
  return f'{e.filename}: {reason}' if e.filename else reason


def _foreign_entries(workdir: str) -> list[str]:
  return sorted(name + ('/' if os.path.isdir(os.path.join(workdir, name))
                        else '')
                for name in os.listdir(workdir) if name not in RUN_ENTRIES)


def _comparable(config: dict, resumable: tuple[str, ...]) -> dict:
  return {k: normalise_path(v) if k in PATH_SETTINGS and isinstance(v, str)
          else v for k, v in config.items()
          if k not in resumable and k != 'num_steps'}


def _check_creatable(workdir: str) -> None:
  """Raises WorkdirError unless a folder can be made at `workdir`."""
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f'--workdir {workdir}: {parent} is a file, so no folder '
                       'can be made under it; choose another --workdir')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f'--workdir {workdir}: cannot create it, {parent} is '
                       'not writable (read-only filesystem or no permission); '
                       'choose another --workdir')


def check_workdir(workdir: str, config: dict, overwrite: bool, *,
                  resumable: tuple[str, ...] = RESUMABLE) -> str:
  """What `prepare_workdir` would do with `workdir`, changing nothing.

  Returns 'new' (missing or empty: the run starts), 'replace' (a run that
  `overwrite` replaces), 'resume' (the same run, unfinished or extended to a
  larger `num_steps`) or 'finished' (its result.json stands). Raises
  WorkdirError for a folder that is not a run of this project (never
  replaced), a run that holds foreign entries (with `overwrite`), a run of
  another configuration (without `overwrite`), a smaller `num_steps`, or a
  folder that cannot be written.
  """
  try:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise WorkdirError(f'--workdir {workdir} is a file, not a folder; '
                         'choose another --workdir')
    if not os.path.isdir(workdir):
      _check_creatable(workdir)
      return 'new'
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise WorkdirError(f'--workdir {workdir} is not writable (read-only '
                         'filesystem or no permission); choose another '
                         '--workdir')
    if not os.listdir(workdir):
      return 'new'
    config_path = os.path.join(workdir, CONFIG_FILE)
    foreign = _foreign_entries(workdir)
    if not os.path.isfile(config_path):
      raise WorkdirError(
          f'--workdir {workdir} is not empty and holds no {CONFIG_FILE}, so '
          'it is not a run of this project and is left alone; choose a new '
          'or empty folder')
    if overwrite:
      if foreign:
        raise WorkdirError(
            f'--workdir {workdir} holds a run and also entries no run writes '
            f'({", ".join(foreign[:5])}{", ..." if len(foreign) > 5 else ""})'
            '; --overwrite replaces only a folder holding a run alone: move '
            'them out or choose another --workdir')
      return 'replace'
    start_again = ('choose another --workdir' if foreign else
                   'choose another --workdir or pass --overwrite to start '
                   'again')
    try:
      with open(config_path) as f:
        old = json.load(f)
      if not isinstance(old, dict):
        raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:
      raise WorkdirError(f'{config_path} is unreadable ({e}); '
                         f'{start_again}') from e
    old_c, new_c = _comparable(old, resumable), _comparable(config, resumable)
    if old_c != new_c:
      diff = sorted(k for k in set(old_c) | set(new_c)
                    if old_c.get(k) != new_c.get(k))
      raise WorkdirError(
          f'--workdir {workdir} holds a run with a different configuration '
          f'(differs in: {", ".join(diff)}); {start_again}')
    old_steps, new_steps = old.get('num_steps'), config.get('num_steps')
    if (old_steps is not None and new_steps is not None
        and new_steps < old_steps):
      raise WorkdirError(
          f'--num_steps={new_steps} is below the {old_steps} of the run in '
          f'{workdir}: a run can be extended, not shortened; '
          f'{start_again}')
    if os.path.exists(os.path.join(workdir, RESULT_FILE)):
      if old_steps is None or new_steps is None or new_steps == old_steps:
        return 'finished'
    return 'resume'
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir}: {describe_os_error(e)}') from e


def prepare_workdir(workdir: str, config: dict, overwrite: bool, *,
                    resumable: tuple[str, ...] = RESUMABLE) -> str:
  """Makes `workdir` ready for the run `config`: returns 'new', 'resume' or
  'finished' (see `check_workdir`, which refuses what cannot be done).

  Call it once flags and data are valid: it is the first write. A new run's
  config.json is written; a replaced run's entries (`RUN_ENTRIES`, nothing
  else) are removed first; a resumed run's config.json takes the new
  `resumable` settings and `num_steps`, and an extended run's result.json is
  removed (the run writes it again when it finishes).
  """
  status = check_workdir(workdir, config, overwrite, resumable=resumable)
  config_path = os.path.join(workdir, CONFIG_FILE)
  try:
    if status == 'finished':
      return status
    if status == 'resume':
      with open(config_path) as f:
        old = json.load(f)
      if old.get('num_steps') != config.get('num_steps'):
        result_path = os.path.join(workdir, RESULT_FILE)
        if os.path.exists(result_path):
          os.remove(result_path)
          logging.info('extending the run in %s from %s to %s steps', workdir,
                       old.get('num_steps'), config.get('num_steps'))
      if old != config:
        write_json_atomic(config_path, config)
      return status
    if status == 'replace':
      for name in RUN_ENTRIES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        elif os.path.lexists(path):
          os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(config_path, config)
    return 'new'
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir}: {describe_os_error(e)}') from e


def finished_result(workdir: str) -> dict:
  """The result.json of a run `prepare_workdir` found 'finished'."""
  logging.info('%s already holds a finished run; nothing to do', workdir)
  path = os.path.join(workdir, RESULT_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f'{path} is unreadable ({e}); delete it to finish the '
                       'run from its last checkpoint, or pass --overwrite to '
                       'start again') from e


def open_workdir(workdir: str, config: dict, overwrite: bool,
                 load: Callable[[], Any], *,
                 resumable: tuple[str, ...] = RESUMABLE) -> tuple[Any, Any]:
  """Readies `workdir` for the run `config` once `load()` (which reads the
  data, and fails on a bad flag or file) has returned, so that a failed
  start leaves the workdir as it was: (what `load` returned, None), or
  (None, result.json's dict) for a finished run (`load` is not called when
  that is known first). With several processes, process 0 prepares the
  workdir and the others follow (`prepare_workdir`)."""
  single = jax.process_count() == 1
  if single and check_workdir(workdir, config, overwrite,
                              resumable=resumable) == 'finished':
    return None, finished_result(workdir)
  loaded = load()
  if single:
    status = prepare_workdir(workdir, config, overwrite, resumable=resumable)
  else:
    if jax.process_index() == 0:
      status = prepare_workdir(workdir, config, overwrite,
                               resumable=resumable)
    multihost_utils.sync_global_devices('dni_jax prepare_workdir')
    if jax.process_index() != 0:  # Reads what process 0 wrote.
      status = prepare_workdir(workdir, config, overwrite=False,
                               resumable=resumable)
  if status == 'finished':
    return None, finished_result(workdir)
  return loaded, None


class MetricsLog:
  """Appends one JSON line per evaluation, flushed, so nothing is lost."""

  def __init__(self, workdir: str, keep_up_to_step: int, write: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.write = write  # False: keep the rows, leave the file to process 0.
    # On resume, lines written after the checkpoint are dropped: they will be
    # written again, identically, so none is lost or duplicated.
    self.rows = [r for r in read_metrics(workdir)
                 if r['step'] <= keep_up_to_step]
    self.tensorboard = None
    if not write:
      return
    tmp = f'{self.path}.tmp'
    with open(tmp, 'w') as f:
      for row in self.rows:
        f.write(json.dumps(row, sort_keys=True) + '\n')
    os.replace(tmp, self.path)
    # The same rows as TensorBoard scalars, in WORKDIR/tensorboard/.
    self.tensorboard = tensorboard_log.ScalarWriter(
        workdir, keep_up_to_step + 1, self.rows)

  def append(self, row: dict) -> None:
    self.rows.append(row)
    if not self.write:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row, sort_keys=True) + '\n')
      f.flush()
    self.tensorboard.write(row)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()

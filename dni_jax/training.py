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
import logging as std_logging
import math
import os
import re
import shutil
import signal
import sys
import time
from typing import Any, Callable, NamedTuple, NoReturn

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dni_jax import parallel
from dni_jax import tensorboard_log

Array = jax.Array
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


def quiet_orbax_logging() -> None:
  """Orbax logs every save step at INFO through absl: keep its warnings and
  errors, each as its first line only (the caller reports a failed save or
  restore in one line of its own; orbax's tracebacks add nothing)."""
  def keep(record):
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < 30:
      return False
    record.msg = record.getMessage().split('\n', 1)[0]
    record.args, record.exc_info, record.exc_text = None, None, None
    return True
  logger = logging.get_absl_logger()
  if not any(getattr(f, 'dni_jax_orbax', False) for f in logger.filters):
    keep.dni_jax_orbax = True
    logger.addFilter(keep)
  # After a failed write, the asyncio loop orbax writes on may log each of
  # its failed write tasks ("Task exception was never retrieved", with a
  # traceback), depending on when they are collected: the failed save is
  # reported in one line by the caller, so those records are dropped.
  def drop_orbax_tasks(record):
    return not ('exception was never retrieved' in str(record.msg)
                and 'orbax' in record.getMessage())
  asyncio_logger = std_logging.getLogger('asyncio')
  if not any(getattr(f, 'dni_jax_orbax', False)
             for f in asyncio_logger.filters):
    drop_orbax_tasks.dni_jax_orbax = True
    asyncio_logger.addFilter(drop_orbax_tasks)


def normalise_path(path: str | None) -> str | None:
  """One spelling of a folder: absolute, symlinks resolved, no trailing
  slash (None stays None)."""
  return None if path is None else os.path.realpath(os.path.expanduser(path))


def check_at_most(settings: Any, limits: dict[str, tuple[int, str]]) -> None:
  """Raises ValueError naming the first flag in `limits` ({name: (bound,
  why)}) whose value (an attribute of `settings`) is above its bound: values
  no run can mean, which would only grow memory or compile time for minutes."""
  for name, (bound, why) in limits.items():
    value = getattr(settings, name)
    if value is not None and value > bound:
      raise ValueError(f'--{name}={value}: must be at most {bound} ({why})')


def check_positive_flags(settings: Any, names: tuple[str, ...]) -> None:
  """Raises ValueError naming the first of `names` (attributes of
  `settings`, one per flag) that is set but not a positive integer."""
  for name in names:
    value = getattr(settings, name)
    if value is not None and value < 1:
      raise ValueError(f'--{name}={value}: must be a positive integer')


def refuse(settings: Any, name: str, why: str) -> NoReturn:
  """Raises ValueError `--name=value: why` for the flag `name` (an attribute
  of `settings`)."""
  raise ValueError(f'--{name}={getattr(settings, name)}: {why}')


def check_positive_finite(settings: Any, names: tuple[str, ...]) -> None:
  """Refuses the first of `names` that is set but not a positive finite
  number."""
  for name in names:
    value = getattr(settings, name)
    if value is not None and not (value > 0 and math.isfinite(value)):
      refuse(settings, name, 'must be a positive finite number')


def check_non_negative(settings: Any, names: tuple[str, ...]) -> None:
  """Refuses the first of `names` that is negative (a seed, say)."""
  for name in names:
    if getattr(settings, name) < 0:
      refuse(settings, name, 'must be >= 0')


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


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------

def _closed_loop_error(kind, value) -> bool:
  return kind is RuntimeError and str(value) == 'Event loop is closed'


def _ignore_closed_event_loop_errors() -> None:
  """After a failed checkpoint write, tensorstore completes the writes still
  in flight on orbax's asyncio loop, already closed, and reports each
  `RuntimeError: Event loop is closed` as an unraisable exception (dozens of
  tracebacks over the one line that says what failed). Those, and only
  those, are dropped (`sys.unraisablehook`, and `sys.excepthook` for the same
  error raised in a thread); installed once per process."""
  if getattr(sys.unraisablehook, 'dni_jax_closed_loop', False):
    return
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable(info):
    if not _closed_loop_error(info.exc_type, info.exc_value):
      previous_unraisable(info)

  def excepthook(kind, value, traceback):
    if not _closed_loop_error(kind, value):
      previous_except(kind, value, traceback)

  unraisable.dni_jax_closed_loop = True
  sys.unraisablehook, sys.excepthook = unraisable, excepthook


def _write_failure(e: Exception) -> str:
  """Why a write failed, in a few words: the OS reason where the error
  carries one (orbax and tensorstore report it as `[os_error_code='28']`)."""
  if isinstance(e, OSError) and e.errno is not None:
    return os.strerror(e.errno)
  text = str(e)
  match = re.search(r"os_error_code='?(\d+)", text)
  if match:
    return os.strerror(int(match.group(1)))
  first = text.splitlines()[0] if text else ''
  return f'{type(e).__name__}: {first[:200]}'


class Checkpointer:
  """Orbax step folders under WORKDIR/checkpoints, the last `max_to_keep` kept."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    _ignore_closed_event_loop_errors()
    self.manager = ocp.CheckpointManager(
        self.directory,
        # Synchronous saves: a failed write (a full disk) raises here, once,
        # instead of in background threads and closed asyncio loops.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=False))

  def save(self, step: int, payload: Any) -> None:
    """Saves `step`; a failed write (a full disk, say) raises TrainingError
    naming the reason, the checkpoints saved before are kept."""
    try:
      self.manager.save(step, args=ocp.args.StandardSave(payload), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise TrainingError(
          f'cannot save checkpoint {step} in {self.directory}: '
          f'{_write_failure(e)}; the checkpoints saved before are kept, make '
          'room and rerun the same command to resume') from e

  def restore_latest(self, abstract_payload: Any,
                     older_layouts: tuple[tuple[Any, Callable], ...] = ()):
    """(step, payload) of the newest checkpoint that restores, or (0, None).

    `older_layouts` are `(abstract, upgrade)` pairs for payloads that earlier
    versions wrote: a checkpoint that does not restore as `abstract_payload`
    is tried as each of them, and `upgrade` turns what restored into the
    current payload, so workdirs written before still resume.
    A checkpoint that restores as none of them (corrupt or half-written) is
    reported, moved aside to WORKDIR/checkpoints_unreadable/<step> (so training
    can save that step again), and the one before used.
    """
    layouts = ((abstract_payload, lambda p: p),) + tuple(older_layouts)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        for k, (abstract, upgrade) in enumerate(layouts):
          try:
            payload = self.manager.restore(
                step, args=ocp.args.StandardRestore(abstract))
            return step, upgrade(payload)
          except Exception:  # pylint: disable=broad-except
            if k == len(layouts) - 1:
              raise
      except Exception as e:  # pylint: disable=broad-except
        aside = os.path.join(os.path.dirname(self.directory),
                             UNREADABLE_DIR, str(step))
        logging.error('checkpoint %s/%d is unreadable (%s: %s); moved to %s, '
                      'trying the previous one', self.directory, step,
                      type(e).__name__,
                      str(e).splitlines()[0] if str(e) else '', aside)
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
    return 0, None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------
# Data order and evaluation.
# ---------------------------------------------------------------------------

class EpochSampler:
  """Batch indices depending only on (seed, step): shuffled epochs without
  replacement, the last incomplete batch of each epoch dropped."""

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if batch_size > num_examples:
      raise ValueError(f'batch_size={batch_size} exceeds the {num_examples} '
                       'training examples')
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = num_examples // batch_size
    self._epoch, self._perm = -1, None

  def indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch, self._perm = epoch, rng.permutation(self.num_examples)
    return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


@jax.jit
def _gather(images, labels, idx):
  return images[idx], labels[idx]


def evaluate(eval_batch: Callable, state: Any, images: Array, labels: Array,
             batch_size: int = 1000,
             place: Callable | None = None) -> dict[str, float]:
  """Test loss and error (%) over the whole set, in fixed-size batches
  (each passed through `place(images, labels)` first, if given)."""
  totals = None
  for start in range(0, images.shape[0], batch_size):
    batch = (images[start:start + batch_size],
             labels[start:start + batch_size])
    sums = eval_batch(state, *(place(*batch) if place else batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'test_loss': round(float(totals['loss_sum']) / count, 6),
          'test_error': round(100.0 * (1.0 - float(totals['num_correct'])
                                       / count), 4)}


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------

class LoopConfig(NamedTuple):
  num_steps: int
  eval_every: int
  log_every: int
  checkpoint_every: int
  batch_size: int
  seed: int


def _health_flags(metrics: dict) -> dict[str, Array]:
  """Per-quantity finiteness of one step's metrics (True = healthy)."""
  flags = {}
  for name, value in metrics.items():
    value = jnp.asarray(value)
    flags[name] = value if name.endswith('_finite') else jnp.isfinite(value)
  return flags


@jax.jit
def _track_health(health: dict, step: Array, metrics: dict) -> dict:
  """Keeps the flags of the first unhealthy step, on device (no host sync)."""
  flags = _health_flags(metrics)
  ok = jnp.all(jnp.stack([jnp.all(f) for f in jax.tree.leaves(flags)]))
  first = (health['step'] < 0) & ~ok
  return {'step': jnp.where(first, step, health['step']),
          'flags': jax.tree.map(lambda new, old: jnp.where(first, new, old),
                                flags, health['flags'])}


# What a False flag at index i-1 means (layers and interfaces counted from the
# bottom, from 1), in causal order: a non-finite output
# of layer i spreads to everything above it and to every gradient; given
# finite outputs, a non-finite synthetic gradient can only come from the model
# on its own interface; given finite synthetic gradients, a non-finite layer
# comes from its own update; regression targets flow downwards, so the highest
# bad synthetic-gradient loss is the origin. The first found is reported.
_CAUSAL_ORDER = (
    ('activation_finite', 'output of layer {i}', min),
    ('synthetic_gradient_finite', 'synthetic gradient on interface {i}', min),
    ('layer_finite', 'parameters or gradient of layer {i}', min),
    ('sg_loss', 'synthetic-gradient loss on interface {i}', max),
)


def non_finite_error(what: str, step: int) -> TrainingError:
  return TrainingError(f'non-finite {what} at step {step}; stopped, the last '
                       'good checkpoint is kept')


def check_health(health: dict) -> None:
  """Raises TrainingError naming the first non-finite step, module, quantity."""
  health = jax.device_get(health)
  step = int(health['step'])
  if step < 0:
    return
  bad = {name: np.flatnonzero(~np.asarray(flag).reshape(-1)).tolist()
         for name, flag in health['flags'].items()}
  what = None
  for name, template, pick in _CAUSAL_ORDER:
    indices = bad.pop(name, [])
    if indices:
      what = template.format(i=pick(indices) + 1)
      break
  if what is None:
    names = [name for name, indices in bad.items() if indices]
    what = 'training loss' if 'loss' in names else ', '.join(names)
  raise non_finite_error(what, step)


class HealthTracker:
  """The finiteness of every step's metrics (those named in `names`, or all),
  kept on device (no host sync per step); `check` raises TrainingError for
  the first unhealthy step (`check_health`)."""

  def __init__(self, names: tuple[str, ...] | None = None):
    self.names = names
    self.health = None

  def track(self, step_after: int, metrics: dict) -> None:
    if self.names is not None:
      metrics = {name: metrics[name] for name in self.names}
    if self.health is None:
      self.health = {'step': jnp.asarray(-1),
                     'flags': jax.tree.map(jnp.ones_like,
                                           _health_flags(metrics))}
    self.health = _track_health(self.health, jnp.asarray(step_after), metrics)

  def check(self) -> None:
    if self.health is not None:
      check_health(self.health)


class StopRequested(Exception):
  """Raised inside a training loop when `StopSignals` recorded a signal."""


class StopSignals:
  """SIGTERM / SIGINT only record the signal; the training loop checks
  `signal` at each step boundary, saves a checkpoint and stops. `install`
  replaces the handlers, `restore` puts the previous ones back."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def install(self) -> 'StopSignals':
    def on_signal(signum, frame):
      del frame
      self.signal = signum
    self._previous = {s: signal.signal(s, on_signal)
                      for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def error(self, step: int) -> 'TrainingError':
    return TrainingError(f'stopped by signal {self.signal} at step {step}; '
                         'checkpoint saved, rerun the same command to resume')


class Schedule(NamedTuple):
  """When a loop logs, evaluates and checkpoints (every N steps, and all
  three at the last step)."""
  num_steps: int
  eval_every: int
  log_every: int
  checkpoint_every: int
  steps_per_call: int = 1   # Steps one `train_step` call advances (all
                            # periods above are multiples of it).


class LoopStats(NamedTuple):
  step: int               # The step the loop stopped at.
  early_stopped: bool     # `should_stop` ended it after an evaluation.
  train_seconds: float    # Training time of this invocation (no evaluations
                          # or checkpoints).
  steps_per_sec: float | None   # Without the first (compiling) interval
                                # unless it is the only one.


def run_loop(*, schedule: Schedule, start_step: int, checkpointer: Checkpointer,
             metrics_log: MetricsLog, train_step: Callable[[int], Any],
             log_text: Callable[[Any], str], evaluate_row: Callable[[int, Any,
                                                                     float],
                                                                    dict],
             payload: Callable[[float], Any], check: Callable[[Any], None],
             should_stop: Callable[[], bool] = lambda: False) -> LoopStats:
  """The host loop every training script shares, from `start_step` to
  `schedule.num_steps` (or an early stop).

  The caller owns the state (in closures); the loop owns the schedule, the
  timing (steps/s, ETA), the metrics log, checkpoints and stop signals:
    train_step(step) -> metrics     one call (`schedule.steps_per_call`
                                    steps), starting at `step`;
    check(fetched)                  at log points: raise TrainingError on a
                                    non-finite state (the last good
                                    checkpoint is kept);
    log_text(fetched) -> str        the progress line's losses (between
                                    "step i/N" and steps/s, ETA);
    evaluate_row(step, fetched, train_seconds) -> dict
                                    the metrics.jsonl row (its `step` added);
    payload(train_seconds)          the checkpoint pytree (called only when
                                    saving; may itself check health);
    should_stop()                   after an evaluation: stop early.
  SIGTERM / SIGINT save a checkpoint at the next step boundary and raise
  TrainingError (rerun to resume). The checkpointer is closed on return.
  """
  stop = StopSignals().install()
  step = start_step
  t_last, step_last = time.perf_counter(), start_step
  train_seconds, timed_seconds, timed_steps = 0.0, 0.0, 0
  early_stopped = False

  def save():
    checkpointer.save(step, payload(train_seconds))

  try:
    while step < schedule.num_steps:
      metrics = train_step(step)
      step += schedule.steps_per_call
      last = step == schedule.num_steps
      is_eval = step % schedule.eval_every == 0 or last
      is_ckpt = step % schedule.checkpoint_every == 0 or last
      if step % schedule.log_every == 0 or is_eval or is_ckpt:
        fetched = jax.device_get(metrics)
        check(fetched)
        now = time.perf_counter()
        train_seconds += now - t_last
        if step_last > start_step or last:
          timed_seconds += now - t_last   # Skips the compile interval.
          timed_steps += step - step_last
        rate = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        logging.info('step %d/%d  %s%.1f steps/s  ETA %s', step,
                     schedule.num_steps, log_text(fetched), rate,
                     _format_seconds((schedule.num_steps - step)
                                     / max(rate, 1e-9)))
      if is_eval:
        row = {'step': step}
        row.update(evaluate_row(step, fetched, train_seconds))
        metrics_log.append(row)
        logging.info('eval %s', json.dumps(row, sort_keys=True))
        t_last = time.perf_counter()   # Evaluation is not training time.
        if should_stop():
          early_stopped = True
          save()
          break
      if is_ckpt:
        save()
        t_last = time.perf_counter()
      if stop.signal is not None:
        raise StopRequested()
  except StopRequested:
    save()
    checkpointer.close()
    raise stop.error(step) from None
  finally:
    stop.restore()
    metrics_log.close()
  checkpointer.close()
  return LoopStats(step, early_stopped, train_seconds,
                   timed_steps / timed_seconds if timed_seconds > 0 else None)


class Hooks(NamedTuple):
  """What an experiment adds to the loop `train` runs (when each is called:
  `run_loop`); the experiment owns its state, in closures."""
  train_step: Callable[[int], Any]
  log_text: Callable[[Any], str]
  evaluate_row: Callable[[int, Any, float], dict]
  payload: Callable[[float], Any]
  should_stop: Callable[[], bool] = lambda: False


def train(*, workdir: str, schedule: Schedule, init_payload: Any,
          start: Callable[[Any, int], Hooks],
          result: Callable[[LoopStats, list[dict]], dict],
          abstract: Any = None,
          older_layouts: tuple[tuple[Any, Callable], ...] = (),
          finite: tuple[str, ...] | None = None,
          primary: bool = True) -> dict:
  """The run harness of every script, on a workdir `open_workdir` prepared:
  restores the latest checkpoint (or starts from `init_payload`), runs the
  loop to `schedule.num_steps` (or an early stop), writes result.json.

  `abstract` is what checkpoints restore as (default: the shapes of
  `init_payload`), `older_layouts` as in `Checkpointer.restore_latest`.
  `start(payload, start_step)` takes the payload to go on from and returns
  the experiment's `Hooks`. Every step's metrics named in `finite` (None:
  all) are checked at each log point and before each checkpoint: a
  non-finite one stops the run (TrainingError), the last good checkpoint
  kept. `result(stats, rows)` returns result.json's dict (`rows`: every
  metrics.jsonl row). Only the `primary` process writes metrics.jsonl and
  result.json.
  """
  quiet_orbax_logging()
  checkpointer = Checkpointer(workdir)
  if abstract is None:
    abstract = jax.eval_shape(lambda: init_payload)
  start_step, payload = checkpointer.restore_latest(
      abstract, older_layouts=older_layouts)
  if payload is None:
    payload = init_payload
  else:
    logging.info('resumed from %s/%d', checkpointer.directory, start_step)
  metrics_log = MetricsLog(workdir, start_step, write=primary)
  hooks = start(payload, start_step)
  health = HealthTracker(finite)

  def train_step(step):
    metrics = hooks.train_step(step)
    health.track(step + schedule.steps_per_call, metrics)
    return metrics

  def checkpoint_payload(train_seconds):
    health.check()  # Never checkpoint a non-finite state.
    return hooks.payload(train_seconds)

  stats = run_loop(
      schedule=schedule, start_step=start_step, checkpointer=checkpointer,
      metrics_log=metrics_log, train_step=train_step,
      log_text=hooks.log_text, evaluate_row=hooks.evaluate_row,
      payload=checkpoint_payload,
      check=lambda fetched: health.check(),  # Every step since the last.
      should_stop=hooks.should_stop)
  summary = result(stats, metrics_log.rows)
  if primary:
    write_json_atomic(os.path.join(workdir, RESULT_FILE), summary)
  return summary


def fit(*, workdir: str, loop: LoopConfig, init_state: Any,
        train_step: Callable, eval_batch: Callable,
        train_data: tuple[np.ndarray, np.ndarray],
        test_data: tuple[np.ndarray, np.ndarray],
        diagnostics: Callable | None = None,
        extra_result: dict | None = None,
        mesh: jax.sharding.Mesh | None = None) -> dict:
  """Trains from the latest checkpoint in `workdir` (or `init_state`) to
  `loop.num_steps`, evaluating, logging and checkpointing; returns the result.

  `train_step(state, images, labels) -> (state, metrics)` with a scalar
  `metrics['loss']`; `eval_batch(state, images, labels)` returns sums with
  `loss_sum`, `num_correct` and `count`. `diagnostics(state)`, if given,
  returns arrays that are written into every metrics line as lists.

  Data parallel (`mesh`, see `dni_jax.parallel`): `init_state` is replicated
  over the mesh and every global batch is gathered on the host and split
  over it. With several processes every process runs `fit` with the same
  arguments and takes part in the checkpoints; only process 0 writes
  metrics.jsonl and result.json.
  """
  if mesh is None:
    train_images = jnp.asarray(train_data[0])
    train_labels = jnp.asarray(train_data[1])
    test_images = jnp.asarray(test_data[0])
    test_labels = jnp.asarray(test_data[1])
    next_batch = lambda idx: _gather(train_images, train_labels, idx)
    place_eval = None
    zero = jnp.zeros((), jnp.float32)
    scalar = lambda v: jnp.asarray(v, jnp.float32)
  else:
    train_images, train_labels = map(np.asarray, train_data)
    test_images, test_labels = map(np.asarray, test_data)
    next_batch = lambda idx: parallel.shard_batch(
        mesh, train_images[idx], train_labels[idx])
    place_eval = lambda x, y: parallel.place_batch(mesh, x, y)
    zero = parallel.replicate(mesh, np.zeros((), np.float32))
    scalar = lambda v: parallel.replicate(mesh, np.asarray(v, np.float32))
  # Several CPU devices of one process: one step in flight at a time (see
  # parallel.one_call_at_a_time: pipelined sharded steps can deadlock there).
  wait_each_step = (mesh is not None and jax.local_device_count() > 1
                    and mesh.devices.flat[0].platform == 'cpu')
  sampler = EpochSampler(train_images.shape[0], loop.batch_size, loop.seed)

  init_payload = {'state': init_state, 'train_loss_sum': zero,
                  'train_loss_count': zero, 'train_time': zero}  # Seconds.
  if mesh is None:
    abstract = jax.eval_shape(lambda: init_payload)
  else:  # Restore onto the mesh, each process its own shards.
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        init_payload)
  # Checkpoints written before `train_time` was kept restore without it.
  without_time = {k: v for k, v in abstract.items() if k != 'train_time'}
  add_time = lambda p: {**p, 'train_time': zero}
  state = loss_sum = loss_count = None
  train_time = 0.0

  def start(payload, start_step):
    del start_step
    nonlocal state, loss_sum, loss_count, train_time
    state = payload['state']
    loss_sum = payload['train_loss_sum']
    loss_count = payload['train_loss_count']
    train_time = float(payload['train_time'])
    return Hooks(train_step=train_step_at, evaluate_row=evaluate_row,
                 log_text=lambda fetched: (
                     f'loss {float(fetched["loss"]):.4f}  '),
                 payload=checkpoint_payload)

  def train_step_at(step):
    nonlocal state, loss_sum, loss_count
    images, labels = next_batch(sampler.indices(step))
    state, metrics = train_step(state, images, labels)
    if wait_each_step:
      jax.block_until_ready(state)
    loss_sum = loss_sum + metrics['loss']
    loss_count = loss_count + 1.0
    return metrics

  def evaluate_row(step, fetched, train_seconds):
    del step
    nonlocal loss_sum, loss_count
    row = {'train_loss': float(loss_sum / jnp.maximum(loss_count, 1.0)),
           'train_time': round(train_time + train_seconds, 3)}
    row.update(evaluate(eval_batch, state, test_images, test_labels,
                        place=place_eval))
    for key in ('sg_loss', 'si_loss'):   # Per interface, last step's.
      if np.asarray(fetched.get(key, [])).size:
        row[key] = [float(v) for v in fetched[key]]
    if diagnostics is not None:
      for key, value in jax.device_get(diagnostics(state)).items():
        row[key] = [float(v) for v in np.asarray(value).reshape(-1)]
    loss_sum, loss_count = zero, zero
    return row

  def checkpoint_payload(train_seconds):
    return {'state': state, 'train_loss_sum': loss_sum,
            'train_loss_count': loss_count,
            'train_time': scalar(train_time + train_seconds)}

  def result(stats, rows):
    best = min(rows, key=lambda r: r['test_error'])
    summary = {
        'num_steps': loop.num_steps,
        'test_error': rows[-1]['test_error'],
        'test_loss': rows[-1]['test_loss'],
        'train_loss': rows[-1]['train_loss'],
        'best_test_error': best['test_error'],
        'best_step': best['step'],
        'steps_per_sec': stats.steps_per_sec,
        'train_time': round(train_time + stats.train_seconds, 3),
    }
    summary.update(extra_result or {})
    return summary

  return train(workdir=workdir,
               schedule=Schedule(loop.num_steps, loop.eval_every,
                                 loop.log_every, loop.checkpoint_every),
               init_payload=init_payload, abstract=abstract,
               older_layouts=((without_time, add_time),), start=start,
               result=result, primary=jax.process_index() == 0)


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

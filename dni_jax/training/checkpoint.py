"""Orbax checkpoints of a run (WORKDIR/checkpoints), and orbax's logging
kept to one line per failure."""

import logging as std_logging
import os
import re
import shutil
import sys
from typing import Any, Callable

from absl import logging
import orbax.checkpoint as ocp

from dni_jax.training.workdir import CHECKPOINT_DIR
from dni_jax.training.workdir import TrainingError
from dni_jax.training.workdir import UNREADABLE_DIR


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
        upgrade, payload = self._restore_as_any(step, layouts)
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
        continue
      # Outside the check above: an upgrade that fails is a bug to report,
      # not a reason to move a readable checkpoint aside.
      return step, upgrade(payload)
    return 0, None

  def _restore_as_any(self, step: int, layouts) -> tuple[Callable, Any]:
    """(upgrade, payload) of the first layout checkpoint `step` restores
    as; the last layout's error if none."""
    restore = lambda abstract: self.manager.restore(
        step, args=ocp.args.StandardRestore(abstract))
    for abstract, upgrade in layouts[:-1]:
      try:
        return upgrade, restore(abstract)
      except Exception:  # pylint: disable=broad-except
        continue   # Try the next (older) layout.
    abstract, upgrade = layouts[-1]
    return upgrade, restore(abstract)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

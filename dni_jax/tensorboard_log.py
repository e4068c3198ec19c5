"""A TensorBoard view of metrics.jsonl, written beside it (tensorboardX's
event-file writer: no TensorFlow).

Every row of metrics.jsonl becomes one TensorBoard event at the row's `step`:
each number is a scalar under its metrics.jsonl name, and each list of numbers
(one value per interface) is one scalar per entry, `name/1`, `name/2`, ...
(interfaces counted from the bottom, from 1). Booleans, strings and missing
values are left out. View with `tensorboard --logdir WORKDIR`.

Events are written synchronously (no writer thread) and flushed after every
row, so what metrics.jsonl holds TensorBoard holds too. A resumed run writes a
new event file that starts with TensorBoard's restart marker at the first step
it will write again, so TensorBoard drops the older file's later points (the
ones metrics.jsonl dropped too).
"""

import os
import time
from typing import Any, Iterable

from tensorboardX import event_file_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

TENSORBOARD_DIR = 'tensorboard'   # Under the workdir.


def scalars(row: dict[str, Any]) -> dict[str, float]:
  """The TensorBoard scalars of one metrics.jsonl row (its `step` aside)."""
  out = {}
  for name, value in row.items():
    if name == 'step':
      continue
    if isinstance(value, (list, tuple)):
      for i, v in enumerate(value, 1):
        if _is_number(v):
          out[f'{name}/{i}'] = float(v)
    elif _is_number(value):
      out[name] = float(value)
  return out


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


class ScalarWriter:
  """Appends metrics rows as TensorBoard scalars to WORKDIR/tensorboard/."""

  def __init__(self, workdir: str, first_step: int,
               earlier_rows: Iterable[dict] = ()):
    """Opens a new event file. `first_step`: the lowest step this writer may
    write (TensorBoard discards points of earlier files from that step on).
    `earlier_rows` (with steps below `first_step`) are written first when the
    folder did not exist yet: a run started before TensorBoard logging keeps
    its whole history."""
    self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
    backfill = not os.path.isdir(self.logdir)
    os.makedirs(self.logdir, exist_ok=True)
    # The name starts with the second it was opened in; the nanoseconds
    # after it keep two files of the same second apart and in the order they
    # were opened (TensorBoard reads a folder's files in name order).
    self._writer = event_file_writer.EventsWriter(
        os.path.join(self.logdir, 'events'), f'.{time.time_ns():020d}')
    self._writer.write_event(event_pb2.Event(
        wall_time=time.time(), step=first_step,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    if backfill:
      for row in earlier_rows:
        self.write(row, flush=False)
    self._writer.flush()

  def write(self, row: dict[str, Any], flush: bool = True) -> None:
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=value)
              for tag, value in scalars(row).items()]
    self._writer.write_event(event_pb2.Event(
        wall_time=time.time(), step=int(row['step']),
        summary=summary_pb2.Summary(value=values)))
    if flush:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
      self._writer = None

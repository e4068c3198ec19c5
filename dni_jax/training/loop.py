"""The host loop every training script shares (`run_loop`): the schedule,
timing and progress, the metrics log, checkpoints and stop signals."""

import json
import math
import signal
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax

from dni_jax.training.checkpoint import Checkpointer
from dni_jax.training.workdir import MetricsLog
from dni_jax.training.workdir import TrainingError


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


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

"""The run harness every script shares (`train`), `fit` (the feed-forward
classifiers' run on it), the data order and evaluation."""

import os
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import parallel
from dni_jax.training.checkpoint import Checkpointer
from dni_jax.training.checkpoint import quiet_orbax_logging
from dni_jax.training.health import HealthTracker
from dni_jax.training.loop import LoopStats
from dni_jax.training.loop import run_loop
from dni_jax.training.loop import Schedule
from dni_jax.training.workdir import MetricsLog
from dni_jax.training.workdir import RESULT_FILE
from dni_jax.training.workdir import write_json_atomic

Array = jax.Array


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


class LoopConfig(NamedTuple):
  num_steps: int
  eval_every: int
  log_every: int
  checkpoint_every: int
  batch_size: int
  seed: int


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
  # Restore onto the devices the initial state lives on (one device, the
  # data-parallel mesh with each process its own shards, or a pipeline's
  # stages), so the step never has to move a restored state.
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

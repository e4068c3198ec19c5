"""The multi-network experiment (Sec. 3.3, A.4) behind
`scripts/train_multinet.py`: settings in, workdir out.

The run is `training.train`'s (config.json, metrics.jsonl with `step`,
result.json written last and atomically, orbax checkpoints, resume, stop on a
signal or a non-finite metric). A *step* is one time step of Network A (one
digit per stream); the loop advances one block of T^2 steps at a time, so
--num_steps, --eval_every, --log_every and --checkpoint_every must be
multiples of T^2. The digit stream depends only on (seed, block index), so a
resumed run sees the same digits as an uninterrupted one.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import methods
from dni_jax import multinet
from dni_jax import settings
from dni_jax import sources
from dni_jax import training
from dni_jax.data import datasets

_TRAIN, _TEST = 0, 1   # Stream ids in the sampler's seed sequence.
_S = settings.setting
# Training metrics that must stay finite (checked at every log point).
FINITE = ('a_loss', 'b_loss', 'sg_loss')


# Values no run can mean (Sec. 3.3, A.4: T = 4, 256 units): far above them,
# a typo would only grow memory and compile time for minutes.
LIMITS = {
    'tick': (32, 'one block of tick^2 steps is one compiled scan; the paper '
             'uses 4'),
    'hidden_size': (16384, 'the paper uses 256'),
    'batch_size': (65536, 'digit streams trained at once'),
    'eval_streams': (65536, 'test streams evaluated at once'),
    'eval_blocks': (100_000, 'blocks scored per evaluation'),
}


@dataclasses.dataclass(frozen=True)
class MultinetExperiment:
  """Everything `scripts/train_multinet.py` sets; validated on construction."""
  workdir: str
  data_dir: str | None = _S(None, 'Folder with the MNIST IDX files '
                            '(train-images-idx3-ubyte[.gz], ...); required.')
  mode: str = _S('dni', 'bprop | dni | no_bprop (also spelt backprop, '
                 'decoupled).', choices=methods.flag_values(multinet.MODES))
  tick: int = _S(4, 'T: B ticks once every T steps of A.')
  sg_scale: float | None = _S(None, 'Factor on the synthetic gradient '
                              'backpropagated into A (default 10, A.4); '
                              '--mode=dni only.')
  learning_rate: float = _S(1e-5, 'Adam learning rate of both networks and '
                            'M (paper: 1e-5).')
  batch_size: int = _S(64, 'Digit streams per batch.')
  hidden_size: int = _S(256, 'Width of the FCN layers, both LSTMs, the '
                        "message and M's hidden layer (A.4: 256).")
  num_steps: int = _S(200_000, 'Time steps of A to train for (a multiple of '
                      'tick^2).')
  eval_every: int | None = _S(None, 'Evaluate every N steps (and at the '
                              'end); a multiple of tick^2, default 125 '
                              'tick^2.')
  log_every: int | None = _S(None, 'Log progress every N steps; default 25 '
                             'tick^2.')
  checkpoint_every: int | None = _S(None, 'Checkpoint every N steps (and at '
                                    'the end); default 625 tick^2.')
  eval_streams: int = _S(256, 'Test streams evaluated in parallel.')
  eval_blocks: int = _S(16, 'Blocks of tick^2 test steps scored per stream '
                        'per evaluation (after one unscored burn-in block).')
  seed: int = _S(0, 'Seed for initialisation and streams.')
  overwrite: bool = False

  def __post_init__(self):
    bad = functools.partial(training.refuse, self)
    if not self.workdir:
      raise ValueError('--workdir is required')
    if not self.data_dir:
      raise ValueError('--data_dir is required (a folder with the MNIST IDX '
                       'files)')
    # Stored in multinet's spelling (config.json as before): bprop ->
    # backprop, no_bprop -> decoupled.
    object.__setattr__(self, 'mode', methods.to_module(
        self.mode, multinet.MODES, 'mode'))
    training.check_positive_flags(self, (
        'tick', 'batch_size', 'hidden_size', 'num_steps', 'eval_every',
        'log_every', 'checkpoint_every', 'eval_streams', 'eval_blocks'))
    training.check_at_most(self, LIMITS)
    if self.batch_size < 2:
      bad('batch_size', 'must be at least 2 (batch normalisation)')
    if self.eval_streams < 2:
      bad('eval_streams', 'must be at least 2')
    block = self.tick ** 2
    for flag in ('num_steps', 'eval_every', 'log_every', 'checkpoint_every'):
      value = getattr(self, flag)
      if value is not None and value % block:
        bad(flag, f'must be a multiple of tick^2 = {block} (the loop advances '
            f'one block of tick^2 steps at a time)')
    if self.sg_scale is not None and self.mode != 'dni':
      raise ValueError('--sg_scale needs synthetic gradients: use --mode=dni '
                       f'(got --mode={methods.canonical(self.mode)})')
    training.check_positive_finite(self, ('learning_rate', 'sg_scale'))
    training.check_non_negative(self, ('seed',))

  @property
  def resolved(self) -> dict[str, Any]:
    block = self.tick ** 2
    return {
        'sg_scale': (10.0 if self.sg_scale is None else self.sg_scale)
                    if self.mode == 'dni' else None,
        'eval_every': self.eval_every or 125 * block,
        'log_every': self.log_every or 25 * block,
        'checkpoint_every': self.checkpoint_every or 625 * block,
    }

  def config_record(self) -> dict[str, Any]:
    record = dataclasses.asdict(self)
    record.update(self.resolved)
    del record['overwrite']
    record['data_dir'] = training.normalise_path(self.data_dir)
    return record

  def model_config(self) -> multinet.MultinetConfig:
    h = self.hidden_size
    return multinet.MultinetConfig(
        mode=self.mode, tick=self.tick, fcn_size=h, hidden_size=h,
        message_size=h, sg_hidden_size=h,
        sg_scale=self.resolved['sg_scale'] or 10.0,
        learning_rate=self.learning_rate)


class DigitStream:
  """`batch_size` independent streams of digits drawn uniformly with
  replacement from (images, labels); block k (steps [k T^2, (k+1) T^2)) is a
  function of (seed, stream id, k) only."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, tick: int,
               batch_size: int, seed: int, stream_id: int):
    self.images = jnp.asarray(images.reshape(images.shape[0], -1))
    self.labels = np.asarray(labels)
    self.tick, self.batch_size = tick, batch_size
    self.seed, self.stream_id = seed, stream_id

  def indices(self, k: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.stream_id, k])
    return rng.integers(0, self.labels.shape[0],
                        size=(self.batch_size, self.tick ** 2))

  def block(self, k: int) -> multinet.Block:
    idx = self.indices(k)
    previous = self.labels[self.indices(k - 1)] if k > 0 else None
    a_targets, b_targets = multinet.stream_targets(self.labels[idx], self.tick,
                                                   previous)
    return multinet.Block(_gather(self.images, jnp.asarray(idx)),
                          jnp.asarray(a_targets), jnp.asarray(b_targets))


@jax.jit
def _gather(images_NxD, idx_BxL):
  return images_NxD[idx_BxL]


def evaluate(net: multinet.Multinet, state_a, state_b,
             stream: DigitStream, num_blocks: int) -> dict[str, float]:
  """Test errors (%) of A and B over `num_blocks` blocks of the test stream,
  with BN's running averages. Same streams every time. The streams start
  from zero states and one block of T^2 steps runs first unscored (a burn-in:
  training streams never restart, and B's first window would be partial)."""
  config = net.config
  carry_a = multinet.zero_carry(config, stream.batch_size)
  carry_b = multinet.zero_carry(config, stream.batch_size)
  totals = None
  for k in range(num_blocks + 1):
    carry_a, carry_b, sums = net.evaluate_block(state_a, state_b, carry_a,
                                                carry_b, stream.block(k))
    if k > 0:
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {
      'a_test_error': round(100.0 * float(totals['a_wrong'])
                            / float(totals['a_count']), 4),
      'b_test_error': round(100.0 * float(totals['b_wrong'])
                            / float(totals['b_count']), 4)}


def _load(data_dir: str, split: str, tick: int, batch_size: int, seed: int,
          stream_id: int) -> DigitStream:
  data = datasets.load_dataset('mnist', split, data_dir, tfds_hint=False)
  return DigitStream(data.images, data.labels, tick, batch_size, seed,
                     stream_id)


def _load_streams(exp: MultinetExperiment) -> tuple[DigitStream, DigitStream]:
  if not os.path.isdir(exp.data_dir):
    raise datasets.DataError(f'--data_dir={exp.data_dir}: no such folder')
  return (_load(exp.data_dir, 'train', exp.tick, exp.batch_size, exp.seed,
                _TRAIN),
          _load(exp.data_dir, 'test', exp.tick, exp.eval_streams, exp.seed,
                _TEST))


def train_multinet(exp: MultinetExperiment) -> dict:
  """Runs (or resumes) one experiment; returns result.json's dict."""
  # Read the data before touching the workdir: a bad --data_dir leaves it as
  # it was (and writes no config.json).
  streams, finished = training.open_workdir(
      exp.workdir, exp.config_record(), exp.overwrite,
      load=lambda: _load_streams(exp))
  if finished is not None:
    return finished
  train_stream, test_stream = streams
  net = multinet.make_multinet(exp.model_config())
  r = exp.resolved
  block = exp.tick ** 2

  state_a, state_b = net.init(jax.random.key(exp.seed), exp.batch_size)
  init_payload = {'a': state_a, 'b': state_b,
                  'train_time': np.zeros((), np.float64)}
  # Checkpoints written before the modules had their own Adam states.
  tx = multinet.make_optimizer(exp.model_config())
  (single_a, upgrade_a), (single_b, upgrade_b) = (
      sources.single_optimizer_layout(tx, s) for s in (state_a, state_b))
  older_layouts = ((jax.eval_shape(lambda: {**init_payload, 'a': single_a,
                                            'b': single_b}),
                    lambda p: {**p, 'a': upgrade_a(p['a']),
                               'b': upgrade_b(p['b'])}),)
  train_time = 0.0
  sums, sums_blocks = None, 0   # Training answers since the last evaluation.

  def start(payload, start_step):
    del start_step
    nonlocal state_a, state_b, train_time
    state_a, state_b = payload['a'], payload['b']
    train_time = float(payload['train_time'])
    return training.Hooks(
        train_step=train_step_at, evaluate_row=evaluate_row,
        log_text=lambda fetched: (
            f'A loss {float(fetched["a_loss"]):.4f}  '
            f'B loss {float(fetched["b_loss"]):.4f}  '
            f'sg_loss {float(fetched["sg_loss"]):.3g}  '),
        payload=lambda seconds: {
            'a': state_a, 'b': state_b,
            'train_time': np.asarray(train_time + seconds, np.float64)})

  def train_step_at(step):
    nonlocal state_a, state_b, sums, sums_blocks
    state_a, state_b, metrics = net.train_block(
        state_a, state_b, train_stream.block(step // block))
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    sums_blocks += 1
    return metrics

  def evaluate_row(step, fetched, seconds):
    del step
    nonlocal sums, sums_blocks
    totals = jax.device_get(sums)
    answers = sums_blocks * exp.batch_size * exp.tick   # Each network's.
    row = {'a_train_error': round(100.0 * float(totals['a_wrong']) / answers,
                                  4),
           'b_train_error': round(100.0 * float(totals['b_wrong']) / answers,
                                  4),
           'sg_loss': float(fetched['sg_loss']),
           'a_updates': int(state_a.updates),
           'b_updates': int(state_b.updates),
           'train_time': round(train_time + seconds, 3)}
    if exp.mode == 'dni':   # Mean over the interval's B updates.
      row['sg_cosine'] = round(float(totals['sg_cosine']) / sums_blocks, 5)
    row.update(evaluate(net, state_a, state_b, test_stream, exp.eval_blocks))
    sums, sums_blocks = None, 0
    return row

  def result(stats, rows):
    summary = {'mode': exp.mode, 'tick': exp.tick, 'num_steps': stats.step,
               'a_updates': int(state_a.updates),
               'b_updates': int(state_b.updates),
               'train_time': round(train_time + stats.train_seconds, 3),
               'steps_per_sec': stats.steps_per_sec,
               'device': jax.devices()[0].device_kind}
    for net_name in ('a', 'b'):
      key = f'{net_name}_test_error'
      best = min(rows, key=lambda row, key=key: row[key])
      summary[key] = rows[-1][key]
      summary[f'best_{key}'] = best[key]
      summary[f'best_{net_name}_step'] = best['step']
    return summary

  return training.train(
      workdir=exp.workdir,
      schedule=training.Schedule(exp.num_steps, r['eval_every'],
                                 r['log_every'], r['checkpoint_every'],
                                 steps_per_call=block),
      init_payload=init_payload, older_layouts=older_layouts, start=start,
      result=result, finite=FINITE)

"""Recurrent experiments (Sec. 3.2, A.3) behind `scripts/train_rnn.py`:
settings in, workdir out.

The run is `training.train`'s (config.json, metrics.jsonl with `step`,
result.json written last and atomically, orbax checkpoints, resume, stop on a
signal or a non-finite metric) with what recurrent training adds: the carried
RNN state, the position in the data stream and the curriculum level live in
the checkpoint.
"""

import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import parallel
from dni_jax import recurrent
from dni_jax import rnn_tasks
from dni_jax import sources
from dni_jax import training
from dni_jax.data import ptb
# The settings, declared and validated once (re-exported here).
from dni_jax.rnn_experiment import RecurrentExperiment

LN2 = math.log(2.0)
# Training metrics that must stay finite (checked at every log point).
FINITE = ('loss', 'sg_loss', 'aux_loss', 'grad_norm')


# ---------------------------------------------------------------------------
# Tasks: data stream, evaluation, and what they keep in the checkpoint.
# ---------------------------------------------------------------------------

class _CopyTask:
  """Copy / Repeat Copy stream with the curriculum (A.3)."""

  def __init__(self, exp: RecurrentExperiment):
    self.exp = exp
    self.task = exp.task
    level = rnn_tasks.first_level(self.task)
    stream = rnn_tasks.first_stream_state(self.task)
    self.host = {'level': np.asarray(level, np.int64),
                 'stream': np.asarray(stream, np.int64),
                 'max_task_length': np.asarray(0, np.int64),
                 'solved_samples': np.asarray(0, np.int64),
                 'samples': np.asarray(0, np.int64)}

  def sizes(self):
    return (rnn_tasks.INPUT_SIZE[self.task], rnn_tasks.OUTPUT_SIZE, 'bernoulli')

  def example_inputs(self) -> np.ndarray:
    return np.zeros((self.exp.batch_size, self.exp.unroll,
                     rnn_tasks.INPUT_SIZE[self.task]), np.float32)

  @property
  def level(self) -> rnn_tasks.Level:
    return rnn_tasks.Level(*map(int, self.host['level']))

  def chunk(self, step: int) -> recurrent.Chunk:
    del step  # The stream position is in self.host.
    arrays, stream = rnn_tasks.stream_chunk(
        self.task, self.exp.seed, self.exp.batch_size,
        rnn_tasks.StreamState(*map(int, self.host['stream'])), self.level,
        self.exp.unroll)
    self.host['stream'] = np.asarray(stream, np.int64)
    self.host['samples'] = self.host['samples'] + arrays[2].size
    return recurrent.Chunk(*arrays)

  def evaluate(self, rec: recurrent.Recurrent, params) -> dict[str, Any]:
    """Bits error at the current level; advances the curriculum if solved."""
    level = self.level
    eps = rnn_tasks.eval_episodes(self.task, self.exp.seed,
                                  self.exp.batch_size, level)
    resets = np.zeros(eps.mask.shape, np.float32)
    state0 = recurrent.zero_state(rec.config, eps.mask.shape[0])
    _, sums = rec.evaluate_chunk(params, state0, recurrent.Chunk(
        eps.inputs, eps.targets, eps.mask, resets))
    sums = jax.device_get(sums)
    bits = float(sums['loss_sum']) / float(sums['count']) / LN2
    row = {'bits_error': round(bits, 5), 'n': level.n, 'r': level.r,
           'task_length': rnn_tasks.task_length(self.task, level),
           'samples_seen': int(self.host['samples'])}
    if bits < rnn_tasks.SOLVED_BITS:
      row['solved'] = True
      self.host['max_task_length'] = np.asarray(row['task_length'], np.int64)
      self.host['solved_samples'] = self.host['samples'].copy()
      self.host['level'] = np.asarray(rnn_tasks.next_level(self.task, level),
                                      np.int64)
      logging.info('solved T_task=%d (N=%d, R=%d) after %d samples; next '
                   'N=%d, R=%d', row['task_length'], level.n, level.r,
                   row['samples_seen'], *self.level[:2])
    return row

  def should_stop(self) -> bool:
    return False

  def result(self) -> dict[str, Any]:
    level = self.level
    return {'max_task_length': int(self.host['max_task_length']),
            'samples_seen': int(self.host['solved_samples']),
            'total_samples': int(self.host['samples']),
            'final_level': {'n': level.n, 'r': level.r},
            'episode_length_at_max': None if level.advances == 0 else
            rnn_tasks.episode_length(
                self.task, *_previous_nr(self.task, level))}


def _previous_nr(task: str, level: rnn_tasks.Level) -> tuple[int, int]:
  level0 = rnn_tasks.first_level(task)
  prev = level0
  for _ in range(level.advances - 1):
    prev = rnn_tasks.next_level(task, prev)
  return prev.n, prev.r


class _PtbTask:
  """Character-level PTB: contiguous training rows, full valid/test streams,
  early stopping on validation BPC (A.3)."""

  SEGMENT = 500

  def __init__(self, exp: RecurrentExperiment):
    self.exp = exp
    self.data = ptb.load_ptb(exp.data_dir)
    self.vocab = self.data['train'].vocab
    self.rows = ptb.train_rows(self.data['train'].ids, exp.batch_size)
    ptb.train_chunk(self.rows, 0, exp.unroll)   # Fails early if too short.
    logging.info('PTB characters: train %d, valid %d, test %d; vocabulary %d',
                 *(self.data[s].ids.shape[0] for s in ptb.SPLITS),
                 len(self.vocab))
    self.host = {'best_valid_bpc': np.asarray(np.inf, np.float64),
                 'test_bpc_at_best': np.asarray(np.nan, np.float64),
                 'best_step': np.asarray(0, np.int64),
                 'evals_since_best': np.asarray(0, np.int64)}

  def sizes(self):
    return len(self.vocab), len(self.vocab), 'categorical'

  def example_inputs(self) -> np.ndarray:
    return np.zeros((self.exp.batch_size, self.exp.unroll), np.int32)

  def chunk(self, step: int) -> recurrent.Chunk:
    return recurrent.Chunk(*ptb.train_chunk(self.rows, step, self.exp.unroll))

  def bpc(self, rec: recurrent.Recurrent, params, split: str) -> float:
    rows = self.exp.resolved['eval_rows']
    state = recurrent.zero_state(rec.config, rows)
    totals = None
    for seg in ptb.eval_segments(self.data[split].ids, rows,
                                 self.SEGMENT):
      state, sums = rec.evaluate_chunk(params, state, recurrent.Chunk(*seg))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return float(totals['loss_sum']) / float(totals['count']) / LN2

  def evaluate(self, rec: recurrent.Recurrent, params, step: int
               ) -> dict[str, Any]:
    valid = self.bpc(rec, params, 'valid')
    row = {'valid_bpc': round(valid, 5)}
    if valid < float(self.host['best_valid_bpc']):
      # A.3: keep the network with the lowest validation BPC; its test BPC
      # is the reported one.
      test = self.bpc(rec, params, 'test')
      row['test_bpc'] = round(test, 5)
      self.host.update(best_valid_bpc=np.asarray(valid, np.float64),
                       test_bpc_at_best=np.asarray(test, np.float64),
                       best_step=np.asarray(step, np.int64),
                       evals_since_best=np.asarray(0, np.int64))
    else:
      self.host['evals_since_best'] = self.host['evals_since_best'] + 1
    return row

  def should_stop(self) -> bool:
    return int(self.host['evals_since_best']) >= self.exp.resolved['patience']

  def result(self) -> dict[str, Any]:
    return {'best_valid_bpc': round(float(self.host['best_valid_bpc']), 5),
            'test_bpc': round(float(self.host['test_bpc_at_best']), 5),
            'best_step': int(self.host['best_step']),
            'vocab_size': len(self.vocab)}


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------

def train_recurrent(exp: RecurrentExperiment) -> dict:
  """Runs (or resumes) one recurrent experiment; returns result.json's dict.

  The streams are split over `exp.num_devices` local devices (data
  parallelism, `parallel.make_data_parallel_recurrent`) when that is > 1.
  """
  # Device settings are checked before the workdir is touched.
  mesh = parallel.make_data_mesh(exp.num_devices)
  parallel.check_batch_size(mesh, exp.batch_size)
  rows = exp.resolved['eval_rows']
  if rows is not None and rows % mesh.size:
    raise ValueError(f'--eval_rows={rows}: must be divisible by the '
                     f'{mesh.size} devices')
  # Evaluations drive the curriculum and early stopping: a rerun keeps
  # --eval_every. Nothing is written before the data is read.
  resumable = tuple(k for k in training.RESUMABLE if k != 'eval_every')
  task, finished = training.open_workdir(
      exp.workdir, exp.config_record(), exp.overwrite,
      load=lambda: _PtbTask(exp) if exp.task == 'ptb' else _CopyTask(exp),
      resumable=resumable)
  if finished is not None:
    return finished
  config = exp.model_config(*task.sizes())
  if mesh.size == 1:
    rec = recurrent.make_recurrent(config)
  else:
    rec = parallel.make_data_parallel_recurrent(config, mesh)
    logging.info('streams split over %d devices', mesh.size)

  zero = np.zeros((), np.float64)
  init_payload = {'state': rec.init(jax.random.key(exp.seed), exp.batch_size,
                                    jnp.asarray(task.example_inputs())),
                  'task': dict(task.host), 'train_bits_sum': zero,
                  'train_bits_count': zero, 'train_time': zero}
  # Checkpoints written before the modules had their own Adam states.
  single_adam, upgrade = sources.single_optimizer_layout(
      recurrent.make_optimizer(config), init_payload['state'])
  older_layouts = (({**init_payload, 'state': single_adam},
                    lambda p: {**p, 'state': upgrade(p['state'])}),)
  state, bits_sum, bits_count, train_time = None, 0.0, 0.0, 0.0
  pending = []   # Device bits of the steps since the last log point.

  def start(payload, start_step):
    del start_step
    nonlocal state, bits_sum, bits_count, train_time
    state = payload['state']
    task.host = {k: np.asarray(v) for k, v in payload['task'].items()}
    bits_sum = float(payload['train_bits_sum'])
    bits_count = float(payload['train_bits_count'])
    train_time = float(payload['train_time'])
    return training.Hooks(
        train_step=train_step_at, log_text=log_text,
        evaluate_row=evaluate_row, payload=checkpoint_payload,
        should_stop=should_stop)

  def train_step_at(step):
    nonlocal state
    state, metrics = rec.train_step(state, task.chunk(step))
    pending.append(metrics['bits'])
    return metrics

  def log_text(fetched):
    nonlocal bits_sum, bits_count, pending
    bits_sum += float(np.sum(jax.device_get(pending)))
    bits_count += len(pending)
    pending = []
    return (f'loss {float(fetched["loss"]):.4f}  '
            f'bits {float(fetched["bits"]):.4f}  '
            f'sg_loss {float(fetched["sg_loss"]):.3g}  ')

  def evaluate_row(step, fetched, seconds):
    nonlocal bits_sum, bits_count
    row = {'train_bits': round(bits_sum / max(bits_count, 1.0), 5),
           'train_time': round(train_time + seconds, 3),
           'samples_seen': step * exp.batch_size * exp.unroll,
           'sg_loss': float(fetched['sg_loss']),
           'aux_loss': float(fetched['aux_loss'])}
    if exp.task == 'ptb':
      row.update(task.evaluate(rec, state.params, step))
    else:
      row.update(task.evaluate(rec, state.params))
    bits_sum, bits_count = 0.0, 0.0
    return row

  def checkpoint_payload(seconds):
    return {'state': state, 'task': dict(task.host),
            'train_bits_sum': np.asarray(bits_sum, np.float64),
            'train_bits_count': np.asarray(bits_count, np.float64),
            'train_time': np.asarray(train_time + seconds, np.float64)}

  def should_stop():
    if task.should_stop():
      logging.info('validation BPC has not improved for %d evaluations: '
                   'early stop', exp.resolved['patience'])
      return True
    return False

  def result(stats, rows):
    del rows
    summary = {'task': exp.task, 'method': exp.method, 'core': exp.core,
               'unroll': exp.unroll,
               'hidden_size': exp.resolved['hidden_size'],
               'num_steps': stats.step, 'early_stopped': stats.early_stopped,
               'train_time': round(train_time + stats.train_seconds, 3),
               'steps_per_sec': stats.steps_per_sec,
               'device': jax.devices()[0].device_kind,
               'num_devices': mesh.size}
    summary.update(task.result())
    return summary

  return training.train(
      workdir=exp.workdir,
      schedule=training.Schedule(exp.num_steps, exp.resolved['eval_every'],
                                 exp.log_every, exp.checkpoint_every),
      init_payload=init_payload, abstract=init_payload,
      older_layouts=older_layouts, start=start, result=result, finite=FINITE)

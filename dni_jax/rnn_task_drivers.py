"""What each recurrent task adds to a run (`rnn_experiments.train_recurrent`):
its data stream, its evaluation, and the host state it keeps in the
checkpoint (`host`: the stream position, the curriculum level, the early-stop
record).

Evaluation runs on its own streams, whatever the training batch size: Copy /
Repeat Copy on `eval_episodes` fresh episodes (A.3's 256 by default), PTB on
the whole split cut into `eval_rows` contiguous streams (64 by default).
"""

import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import recurrent
from dni_jax import rnn_tasks
from dni_jax.data import ptb

LN2 = math.log(2.0)


class CopyTask:
  """Copy / Repeat Copy stream with the curriculum (A.3), for `exp`, a
  `rnn_experiments.RecurrentExperiment`."""

  def __init__(self, exp):
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

  def evaluate(self, rec: recurrent.Recurrent, params, step: int = 0
               ) -> dict[str, Any]:
    """Bits error at the current level, on `eval_episodes` fresh episodes
    from a zero state; advances the curriculum if solved."""
    del step  # The level is in self.host.
    level = self.level
    eps = rnn_tasks.eval_episodes(self.task, self.exp.seed,
                                  self.exp.resolved['eval_episodes'], level)
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


class PtbTask:
  """Character-level PTB: contiguous training rows, full valid/test streams,
  early stopping on validation BPC (A.3), for `exp`, a
  `rnn_experiments.RecurrentExperiment`."""

  SEGMENT = 500

  def __init__(self, exp):
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



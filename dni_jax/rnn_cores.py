"""Recurrent cores as pure functions (params, state, x) -> (state, y): the
peephole LSTM of Graves (2013), a tanh RNN and a leaky RNN, and `unroll`,
T steps of one in `lax.scan` with per-stream episode resets. Re-exported by
`dni_jax.recurrent`."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dni_jax import functional
from dni_jax.rnn_config import RecurrentConfig

Array = jax.Array
Params = dict[str, Any]
CoreState = tuple[Array, ...]   # (h_BxH,) or (h_BxH, c_BxH).


def init_core(key: Array, core: str, input_size: int, hidden_size: int
              ) -> Params:
  """Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LSTM forget bias 1."""
  gates = 4 if core == 'lstm' else 1
  kx, kh, kp = jax.random.split(key, 3)
  fan_in = input_size + hidden_size
  params = {
      'w_x': functional.uniform(kx, (input_size, gates * hidden_size), fan_in),
      'w_h': functional.uniform(kh, (hidden_size, gates * hidden_size), fan_in),
      'b': jnp.zeros((gates * hidden_size,), jnp.float32),
  }
  if core == 'lstm':
    params['b'] = params['b'].at[hidden_size:2 * hidden_size].set(1.0)
    params['peephole'] = functional.uniform(kp, (3, hidden_size), hidden_size)
  return params


def _preactivation(params: Params, h: Array, x_BxI: Array) -> Array:
  """W_x x + W_h h + b."""
  return functional.add_bias(x_BxI @ params['w_x'] + h @ params['w_h'],
                             params['b'])


def lstm_step(params: Params, state: CoreState, x_BxI: Array
              ) -> tuple[CoreState, Array]:
  """The LSTM of Graves (2013), Eq. (7)-(11), *with* peephole connections
  (diagonal w_ci, w_cf, w_co; the output gate peeks at the new cell):

    i = sig(W_xi x + W_hi h + w_ci * c + b_i)
    f = sig(W_xf x + W_hf h + w_cf * c + b_f)
    c' = f * c + i * tanh(W_xc x + W_hc h + b_c)
    o = sig(W_xo x + W_ho h + w_co * c' + b_o)
    h' = o * tanh(c');   output y = h'.
  """
  h, c = state
  z = _preactivation(params, h, x_BxI)
  zi, zf, zc, zo = jnp.split(z, 4, axis=-1)
  w_ci, w_cf, w_co = params['peephole'][:, None, :]   # Each [1, H].
  i = jax.nn.sigmoid(zi + w_ci * c)
  f = jax.nn.sigmoid(zf + w_cf * c)
  c_new = f * c + i * jnp.tanh(zc)
  o = jax.nn.sigmoid(zo + w_co * c_new)
  h_new = o * jnp.tanh(c_new)
  return (h_new, c_new), h_new


def rnn_step(params: Params, state: CoreState, x_BxI: Array
             ) -> tuple[CoreState, Array]:
  """Vanilla RNN: h' = tanh(W_x x + W_h h + b); y = h'."""
  (h,) = state
  h_new = jnp.tanh(_preactivation(params, h, x_BxI))
  return (h_new,), h_new


def leaky_rnn_step(params: Params, state: CoreState, x_BxI: Array, leak: float
                   ) -> tuple[CoreState, Array]:
  """Leaky RNN (Sec. 3.2's ref. [17]):
  h' = (1 - a) h + a tanh(W_x x + W_h h + b)."""
  (h,) = state
  pre = jnp.tanh(_preactivation(params, h, x_BxI))
  h_new = (1.0 - leak) * h + leak * pre
  return (h_new,), h_new


def core_step_fn(config: RecurrentConfig) -> Callable:
  if config.core == 'lstm':
    return lstm_step
  if config.core == 'rnn':
    return rnn_step
  return functools.partial(leaky_rnn_step, leak=config.leak)


def zero_state(config: RecurrentConfig, batch_size: int) -> CoreState:
  return tuple(jnp.zeros((batch_size, config.hidden_size), jnp.float32)
               for _ in range(config.num_state))


def _as_features(config: RecurrentConfig, inputs: Array) -> Array:
  if config.loss == 'categorical':
    return jax.nn.one_hot(inputs, config.input_size, dtype=jnp.float32)
  return inputs.astype(jnp.float32)


def unroll(config: RecurrentConfig, core_params: Params, state0: CoreState,
           inputs: Array, resets_BxT: Array
           ) -> tuple[CoreState, Array, tuple[Array, ...]]:
  """Runs the core over T steps with `lax.scan`.

  Returns (s_T, outputs y f32[B, T, H], states: each f32[B, T, H], the state
  after every step). Where resets[b, t] = 1 the state of stream b is zeroed
  before step t (a new episode), so no gradient crosses the episode boundary.
  """
  step = core_step_fn(config)
  x_TxBxI = jnp.swapaxes(_as_features(config, inputs), 0, 1)
  r_TxB = jnp.swapaxes(resets_BxT, 0, 1)

  def body(state, xr):
    x_BxI, r_B = xr
    state = tuple(s * (1.0 - r_B[:, None]) for s in state)
    state, y = step(core_params, state, x_BxI)
    return state, (y, state)

  state_T, (y_TxBxH, states) = jax.lax.scan(body, state0, (x_TxBxI, r_TxB))
  return (state_T, jnp.swapaxes(y_TxBxH, 0, 1),
          tuple(jnp.swapaxes(s, 0, 1) for s in states))



def split_state(config: RecurrentConfig, flat: Array) -> CoreState:
  """[..., num_state * H] -> (h, c) or (h,), matching the core state."""
  return tuple(jnp.split(flat, config.num_state, axis=-1))


def flatten_state(state: CoreState) -> Array:
  return jnp.concatenate(state, axis=-1)

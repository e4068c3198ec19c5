"""The two-network system's layers (A.4): BatchNorm per time step with its
running averages, the recurrent-BN LSTM of Cooijmans et al. (2016), Linear ->
BN, and the synthetic-gradient model M."""

import jax
import jax.numpy as jnp

from dni_jax import functional
from dni_jax.multinet.config import Array
from dni_jax.multinet.config import LstmState
from dni_jax.multinet.config import MultinetConfig
from dni_jax.multinet.config import Params


def init_bn_stats(size: int) -> Params:
  """Running averages of a new BN site: mean 0, variance 1."""
  return {'mean': jnp.zeros((size,), jnp.float32),
          'var': jnp.ones((size,), jnp.float32)}


def batch_norm(config: MultinetConfig, x: Array, gamma: Array,
               beta: Array | None, running: Params, training: bool
               ) -> tuple[Array, tuple[Array, Array]]:
  """BN over the batch axis 0 only: x[B, ..., D] is normalised per time step
  (every index of the middle axes has its own batch statistics) in training,
  with the running averages at test time. Returns (y, (mean, var) [..., D],
  the batch statistics, for the running averages)."""
  if training:
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean[None]), axis=0)
    y = (x - mean[None]) * jax.lax.rsqrt(var[None] + config.bn_epsilon)
  else:
    mean, var = running['mean'], running['var']
    y = (x - functional.feature(mean, x)) * jax.lax.rsqrt(
        functional.feature(var, x) + config.bn_epsilon)
  y = y * functional.feature(gamma, y)
  if beta is not None:
    y = y + functional.feature(beta, y)
  return y, (mean, var)


def update_running(config: MultinetConfig, running: Params,
                   moments: tuple[Array, Array]) -> Params:
  """r <- mu^n r + (1 - mu^n) mean over the n time positions of the batch
  statistics (moments: each [n, D], or [D] for one position)."""
  mean, var = moments
  mean, var = mean.reshape(-1, mean.shape[-1]), var.reshape(-1, var.shape[-1])
  decay = config.bn_momentum ** mean.shape[0]
  return {'mean': decay * running['mean'] + (1 - decay) * jnp.mean(mean, 0),
          'var': decay * running['var'] + (1 - decay) * jnp.mean(var, 0)}


def init_bn_lstm(config: MultinetConfig, key: Array, input_size: int
                 ) -> tuple[Params, Params]:
  """(params, running stats) of an LSTM with recurrent BN; forget bias 1."""
  h = config.hidden_size
  kx, kh = jax.random.split(key)
  params = {
      'w_x': functional.uniform(kx, (input_size, 4 * h), input_size + h),
      'w_h': functional.uniform(kh, (h, 4 * h), input_size + h),
      'b': jnp.zeros((4 * h,), jnp.float32).at[h:2 * h].set(1.0),
      'gamma_x': jnp.full((4 * h,), config.recurrent_gamma, jnp.float32),
      'gamma_h': jnp.full((4 * h,), config.recurrent_gamma, jnp.float32),
      'gamma_c': jnp.full((h,), config.recurrent_gamma, jnp.float32),
      'beta_c': jnp.zeros((h,), jnp.float32),
  }
  stats = {'x': init_bn_stats(4 * h), 'h': init_bn_stats(4 * h),
           'c': init_bn_stats(h)}
  return params, stats


def bn_lstm_unroll(config: MultinetConfig, params: Params, running: Params,
                   state0: LstmState, x_BxLxI: Array, training: bool
                   ) -> tuple[LstmState, Array, Params]:
  """Cooijmans et al. (2016), Eq. (6)-(8), over L steps in `lax.scan`:

    (i, f, g, o) = BN(W_h h; gamma_h) + BN(W_x x; gamma_x) + b
    c' = sig(f) * c + sig(i) * tanh(g)
    h' = sig(o) * tanh(BN(c'; gamma_c, beta_c))

  Returns (s_L, outputs h f32[B, L, H], batch moments {'x', 'h', 'c'}: each
  (mean, var) f32[L, D], one row per time step).
  """
  zx_BxLx4H = x_BxLxI @ params['w_x']   # Non-recurrent: all steps at once.
  zx_BxLx4H, moments_x = batch_norm(config, zx_BxLx4H, params['gamma_x'], None,
                                    running['x'], training)
  zx_LxBx4H = jnp.swapaxes(zx_BxLx4H, 0, 1)

  def body(state, zx_Bx4H):
    h, c = state
    zh, moments_h = batch_norm(config, h @ params['w_h'], params['gamma_h'],
                               None, running['h'], training)
    z = functional.add_bias(zx_Bx4H + zh, params['b'])
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    c_new = jax.nn.sigmoid(zf) * c + jax.nn.sigmoid(zi) * jnp.tanh(zg)
    c_norm, moments_c = batch_norm(config, c_new, params['gamma_c'],
                                   params['beta_c'], running['c'], training)
    h_new = jax.nn.sigmoid(zo) * jnp.tanh(c_norm)
    return (h_new, c_new), (h_new, moments_h, moments_c)

  state_L, (h_LxBxH, moments_h, moments_c) = jax.lax.scan(body, state0,
                                                         zx_LxBx4H)
  return state_L, jnp.swapaxes(h_LxBxH, 0, 1), {
      'x': moments_x, 'h': moments_h, 'c': moments_c}


def init_bn_linear(key: Array, fan_in: int, fan_out: int) -> Params:
  """Linear -> BN (gamma 1, beta 0; the linear has no bias, BN's beta is it)."""
  return {'w': functional.uniform(key, (fan_in, fan_out), fan_in),
          'gamma': jnp.ones((fan_out,), jnp.float32),
          'beta': jnp.zeros((fan_out,), jnp.float32)}


def bn_linear(config: MultinetConfig, params: Params, running: Params,
              x: Array, training: bool) -> tuple[Array, tuple[Array, Array]]:
  """Linear -> BN: (y, the batch moments), as `batch_norm`."""
  return batch_norm(config, x @ params['w'], params['gamma'], params['beta'],
                    running, training)


def init_sg_model(config: MultinetConfig, key: Array) -> Params:
  """M: message -> hidden (ReLU) -> synthetic gradient; the last layer is
  zero-initialised (A.1), so a new M emits exactly zero."""
  return functional.init_mlp(key, config.message_size, config.sg_hidden_size,
                             config.message_size)


# M(m) on [..., message_size].
sg_model_apply = functional.mlp_apply


def update_stats(config: MultinetConfig, running: Params, moments: Params
                 ) -> Params:
  """Running averages of every BN site from one update's batch moments."""
  return jax.tree.map(
      lambda r, m: update_running(config, r, m), running, moments,
      is_leaf=lambda x: isinstance(x, dict) and 'mean' in x)

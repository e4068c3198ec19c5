"""Multi-network system (Sec. 3.3, Fig. 8, A.4): two RNNs ticking at different
rates, bridged by a DNI on the message from Network A to Network B.

Network A (FCN + recurrent-BN LSTM) reads one digit per step and every T steps
counts odd digits and sends a message to Network B, which ticks once every T
steps and counts 3s among the last T^2 digits. Modes: `backprop` (one joint
graph per T^2 steps), `dni` (A consumes sg_scale * M(m); B trains M to the
true message gradients it returns) and `decoupled` (A's message gets zero
gradient). The design in full (modes, gradient convention, choices where the
paper is silent): docs/architecture/recurrent_multinet.md and docs/MULTINET.md.
"""

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dni_jax import functional
from dni_jax import interface
from dni_jax import losses
from dni_jax import sources

Array = jax.Array
Params = dict[str, Any]
LstmState = tuple[Array, Array]   # (h_BxH, c_BxH).

MODES = ('backprop', 'dni', 'decoupled')
ODD, THREE = 'odd', 'three'


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
    raise ValueError(f'a block holds tick^2 = {tick * tick} steps, got {length}')
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


# ---------------------------------------------------------------------------
# Layers: BatchNorm, the recurrent-BN LSTM, the FCN, M.
# ---------------------------------------------------------------------------

def _bn_stats(size: int) -> Params:
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
  stats = {'x': _bn_stats(4 * h), 'h': _bn_stats(4 * h), 'c': _bn_stats(h)}
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


def _init_bn_linear(key: Array, fan_in: int, fan_out: int) -> Params:
  """Linear -> BN (gamma 1, beta 0; the linear has no bias, BN's beta is it)."""
  return {'w': functional.uniform(key, (fan_in, fan_out), fan_in),
          'gamma': jnp.ones((fan_out,), jnp.float32),
          'beta': jnp.zeros((fan_out,), jnp.float32)}


def _bn_linear(config, params, running, x, training):
  return batch_norm(config, x @ params['w'], params['gamma'], params['beta'],
                    running, training)


def init_sg_model(config: MultinetConfig, key: Array) -> Params:
  """M: message -> hidden (ReLU) -> synthetic gradient; the last layer is
  zero-initialised (A.1), so a new M emits exactly zero."""
  return functional.init_mlp(key, config.message_size, config.sg_hidden_size,
                             config.message_size)


# M(m) on [..., message_size].
sg_model_apply = functional.mlp_apply


# ---------------------------------------------------------------------------
# The two networks' forward passes and losses.
# ---------------------------------------------------------------------------

def zero_carry(config: MultinetConfig, batch_size: int) -> LstmState:
  shape = (batch_size, config.hidden_size)
  # Two buffers, not one twice: the states are donated to the updates.
  return (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def init_a(config: MultinetConfig, key: Array) -> tuple[Params, Params]:
  k1, k2, kc, kr, km = jax.random.split(key, 5)
  core, core_stats = init_bn_lstm(config, kc, config.fcn_size)
  params = {
      'fcn1': _init_bn_linear(k1, config.image_size, config.fcn_size),
      'fcn2': _init_bn_linear(k2, config.fcn_size, config.fcn_size),
      'core': core,
      'readout': functional.init_linear(kr, config.hidden_size,
                                        config.a_classes),
      'message': _init_bn_linear(km, config.hidden_size, config.message_size),
  }
  stats = {'fcn1': _bn_stats(config.fcn_size),
           'fcn2': _bn_stats(config.fcn_size), 'core': core_stats,
           'message': _bn_stats(config.message_size)}
  return params, stats


def init_b(config: MultinetConfig, key: Array) -> tuple[Params, Params]:
  kc, kr, ks = jax.random.split(key, 3)
  core, core_stats = init_bn_lstm(config, kc, config.message_size)
  params = {'core': core,
            'readout': functional.init_linear(kr, config.hidden_size,
                                              config.b_classes)}
  if config.mode == 'dni':
    params['sg'] = init_sg_model(config, ks)
  return params, {'core': core_stats}


class AOutputs(NamedTuple):
  logits: Array       # f32[B, K, T + 1]: A's classifier at each tick.
  messages: Array     # f32[B, K, message_size].
  carry: LstmState    # A's state after the L steps.
  moments: Params     # Batch statistics per BN site (training only).


def a_forward(config: MultinetConfig, params: Params, running: Params,
              carry: LstmState, images_BxLxD: Array, training: bool
              ) -> AOutputs:
  """A over L = K T steps: FCN, BN-LSTM; classifier and message at the last
  step of each window of T."""
  batch, length = images_BxLxD.shape[:2]
  x, m1 = _bn_linear(config, params['fcn1'], running['fcn1'], images_BxLxD,
                     training)
  x, m2 = _bn_linear(config, params['fcn2'], running['fcn2'], jax.nn.relu(x),
                     training)
  carry, h_BxLxH, m_core = bn_lstm_unroll(
      config, params['core'], running['core'], carry, jax.nn.relu(x), training)
  ticks = length // config.tick
  h_BxKxH = h_BxLxH.reshape(batch, ticks, config.tick, -1)[:, :, -1]
  messages, m_msg = _bn_linear(config, params['message'], running['message'],
                               h_BxKxH, training)
  return AOutputs(functional.linear(params['readout'], h_BxKxH), messages,
                  carry,
                  {'fcn1': m1, 'fcn2': m2, 'core': m_core, 'message': m_msg})


def b_forward(config: MultinetConfig, params: Params, running: Params,
              carry: LstmState, messages_BxKxM: Array, training: bool
              ) -> tuple[Array, LstmState, Params]:
  """B over K ticks: (logits f32[B, K, T^2 + 1], carry, batch moments)."""
  carry, h_BxKxH, moments = bn_lstm_unroll(
      config, params['core'], running['core'], carry, messages_BxKxM, training)
  logits = functional.linear(params['readout'], h_BxKxH)
  return logits, carry, {'core': moments}


def classification_loss(logits: Array, targets: Array) -> tuple[Array, Array]:
  """(Batch mean of the cross-entropy summed over the K outputs, number of
  wrong arg-max answers)."""
  nll = losses.softmax_cross_entropy(logits, targets)
  wrong = jnp.sum(jnp.argmax(logits, axis=-1) != targets)
  return jnp.sum(nll) / logits.shape[0], wrong


def update_stats(config: MultinetConfig, running: Params, moments: Params
                 ) -> Params:
  """Running averages of every BN site from one update's batch moments."""
  return jax.tree.map(
      lambda r, m: update_running(config, r, m), running, moments,
      is_leaf=lambda x: isinstance(x, dict) and 'mean' in x)


def make_optimizer(config: MultinetConfig) -> optax.GradientTransformation:
  return optax.adam(config.learning_rate)


def _apply(config: MultinetConfig, state: NetState, grads: Params,
           moments: Params, carry: LstmState) -> NetState:
  params, opt_state = sources.apply_gradients_to_modules(
      make_optimizer(config), state.params, state.opt_state, grads)
  return NetState(params=params, opt_state=opt_state,
                  bn_stats=update_stats(config, state.bn_stats, moments),
                  carry=carry, updates=state.updates + 1)


# ---------------------------------------------------------------------------
# Updates.
# ---------------------------------------------------------------------------

class AGradients(NamedTuple):
  grads: Params       # Of L_A + sum_k <g_k, m_k> / B w.r.t. A's parameters.
  loss: Array         # L_A: batch mean of the cross-entropy summed over K.
  wrong: Array        # i32[]: wrong answers of A's classifier.
  messages: Array     # f32[B, K, M], the messages sent (no gradient).
  message_grad: Array  # f32[B, K, M], the per-example g consumed.
  carry: LstmState
  moments: Params


def a_gradients(config: MultinetConfig, state: NetState, images_BxLxD: Array,
                targets_BxK: Array, message_grad: Array | Callable
                ) -> AGradients:
  """A's gradient over L = K T steps from one `jax.vjp` (Eq. 1):

    dtheta_A = d L_A / dtheta_A + sum_k <g_k, dm_k/dtheta_A> / B,

  `message_grad` g: the per-example gradient of the K messages, f32[B, K, M],
  or a function of the messages returning it (DNI: sg_scale * M(m), computed
  from the same forward pass).
  """
  def fn(params):
    out = a_forward(config, params, state.bn_stats, state.carry, images_BxLxD,
                    True)
    loss, wrong = classification_loss(out.logits, targets_BxK)
    return (loss, out.messages), (wrong, out.carry, out.moments)

  (loss, messages), vjp_fn, (wrong, carry, moments) = jax.vjp(
      fn, state.params, has_aux=True)
  grad = message_grad(messages) if callable(message_grad) else message_grad
  grad = jax.lax.stop_gradient(grad)
  # L_A is already the batch mean: its cotangent is 1; the messages' g / B.
  grads, _ = interface.pull_back(
      lambda g: (vjp_fn((jnp.ones_like(loss), g))[0], ()), grad)
  return AGradients(grads, loss, wrong, jax.lax.stop_gradient(messages), grad,
                    carry, moments)


def a_update(config: MultinetConfig, state: NetState, images_BxLxD: Array,
             targets_BxK: Array, message_grad: Array | Callable
             ) -> tuple[NetState, Array, dict[str, Array]]:
  """One Adam update of A from `a_gradients`; (state, messages, metrics)."""
  out = a_gradients(config, state, images_BxLxD, targets_BxK, message_grad)
  new_state = _apply(config, state, out.grads, out.moments, out.carry)
  metrics = {'loss': out.loss, 'wrong': out.wrong,
             'message_grad_norm': jnp.sqrt(jnp.mean(jnp.sum(
                 jnp.square(out.message_grad), axis=-1)))}
  return new_state, out.messages, metrics


def a_step(config: MultinetConfig, state: NetState, sg_params: Params | None,
           images_BxLxD: Array, targets_BxK: Array
           ) -> tuple[NetState, Array, dict[str, Array]]:
  """A's decoupled update: `dni` consumes sg_scale * M(m) (M: B's current
  `sg_params`); `decoupled` a gradient of exactly zero (sg_params unused)."""
  if config.mode == 'dni':
    grad = lambda m: config.sg_scale * sg_model_apply(sg_params, m)
  elif config.mode == 'decoupled':
    grad = lambda m: jnp.zeros_like(m)
  else:
    raise ValueError(f'a_step is for the decoupled modes, not {config.mode!r}')
  return a_update(config, state, images_BxLxD, targets_BxK, grad)


def b_gradients(config: MultinetConfig, state: NetState, messages_BxKxM: Array,
                targets_BxK: Array):
  """((grads of core/readout, per-example gradient w.r.t. the messages
  B * dL_B/dm), loss, wrong, carry, moments) from one `jax.vjp`."""
  trainable = {'core': state.params['core'],
               'readout': state.params['readout']}

  def fn(params, messages):
    logits, carry, moments = b_forward(config, params, state.bn_stats,
                                       state.carry, messages, True)
    loss, wrong = classification_loss(logits, targets_BxK)
    return loss, (wrong, carry, moments)

  loss, vjp_fn, (wrong, carry, moments) = jax.vjp(fn, trainable,
                                                  messages_BxKxM, has_aux=True)
  # L_B (batch mean, cotangent 1) is the only output: nothing comes from
  # above, and the messages' gradient is converted to per example.
  grads, grad_messages = interface.pull_back(
      lambda _: vjp_fn(jnp.ones_like(loss)), (),
      batch_size=messages_BxKxM.shape[0])
  return grads, grad_messages, loss, wrong, carry, moments


def b_step(config: MultinetConfig, state: NetState, messages_BxKxM: Array,
           targets_BxK: Array) -> tuple[NetState, Array, dict[str, Array]]:
  """B's update over its K ticks (BPTT within them). In `dni` it also trains
  M on the messages A sent, to the true gradients B returns (L2, weight 1,
  averaged over the K messages). Returns (state, the true per-example message
  gradients f32[B, K, M], metrics)."""
  grads, true_grad, loss, wrong, carry, moments = b_gradients(
      config, state, messages_BxKxM, targets_BxK)
  grads = dict(grads)
  sg_loss = sg_cosine = jnp.zeros((), jnp.float32)
  if config.mode == 'dni':
    def m_loss(sg_params):
      prediction = sg_model_apply(sg_params, messages_BxKxM)
      return jnp.mean(jax.vmap(interface.synthetic_gradient_loss, in_axes=1)(
          prediction, true_grad)), prediction
    (sg_loss, prediction), grads['sg'] = jax.value_and_grad(
        m_loss, has_aux=True)(state.params['sg'])
    # Fig. 10's diagnostic: how well M(m) points along the true gradient.
    sg_cosine = interface.gradient_diagnostics(
        prediction.reshape(-1, prediction.shape[-1]),
        true_grad.reshape(-1, true_grad.shape[-1]))['cosine']
  new_state = _apply(config, state, grads, moments, carry)
  metrics = {'loss': loss, 'wrong': wrong, 'sg_loss': sg_loss,
             'sg_cosine': sg_cosine}
  return new_state, true_grad, metrics


def joint_loss(config: MultinetConfig, params_a: Params, params_b: Params,
               state_a: NetState, state_b: NetState, block: Block):
  """L_A + L_B of the joint graph over one block of T^2 steps (backprop)."""
  out = a_forward(config, params_a, state_a.bn_stats, state_a.carry,
                  block.images, True)
  loss_a, wrong_a = classification_loss(out.logits, block.a_targets)
  logits_b, carry_b, moments_b = b_forward(config, params_b, state_b.bn_stats,
                                           state_b.carry, out.messages, True)
  loss_b, wrong_b = classification_loss(logits_b, block.b_targets)
  return loss_a + loss_b, (loss_a, loss_b, wrong_a, wrong_b, out.carry,
                           out.moments, carry_b, moments_b)


def joint_step(config: MultinetConfig, state_a: NetState, state_b: NetState,
               block: Block) -> tuple[NetState, NetState, dict[str, Array]]:
  """`backprop`: one update of both networks from the joint graph."""
  (_, aux), (grads_a, grads_b) = jax.value_and_grad(
      functools.partial(joint_loss, config), argnums=(0, 1), has_aux=True)(
          state_a.params, state_b.params, state_a, state_b, block)
  loss_a, loss_b, wrong_a, wrong_b, carry_a, moments_a, carry_b, moments_b = aux
  new_a = _apply(config, state_a, grads_a, moments_a, carry_a)
  new_b = _apply(config, state_b, grads_b, moments_b, carry_b)
  return new_a, new_b, {'a_loss': loss_a, 'b_loss': loss_b,
                        'a_wrong': wrong_a, 'b_wrong': wrong_b,
                        'sg_loss': jnp.zeros((), jnp.float32),
                        'sg_cosine': jnp.zeros((), jnp.float32)}


def evaluate_block(config: MultinetConfig, state_a: NetState,
                   state_b: NetState, carry_a: LstmState, carry_b: LstmState,
                   block: Block) -> tuple[LstmState, LstmState, dict]:
  """Forward only, running BN averages: (carries, sums of wrong answers and
  counts of both networks over the block)."""
  out = a_forward(config, state_a.params, state_a.bn_stats, carry_a,
                  block.images, False)
  logits_b, carry_b, _ = b_forward(config, state_b.params, state_b.bn_stats,
                                   carry_b, out.messages, False)
  _, wrong_a = classification_loss(out.logits, block.a_targets)
  _, wrong_b = classification_loss(logits_b, block.b_targets)
  return out.carry, carry_b, {'a_wrong': wrong_a, 'b_wrong': wrong_b,
                              'a_count': block.a_targets.size,
                              'b_count': block.b_targets.size}


def init_states(config: MultinetConfig, key: Array, batch_size: int
                ) -> tuple[NetState, NetState]:
  """A's and B's states; the same key gives A and B's core/readout the same
  initial values in every mode."""
  key_a, key_b = jax.random.split(key)
  states = []
  for params, stats in (init_a(config, key_a), init_b(config, key_b)):
    states.append(NetState(params=params,
                           opt_state=sources.init_modules(
                               make_optimizer(config), params),
                           bn_stats=stats,
                           carry=zero_carry(config, batch_size),
                           updates=jnp.zeros((), jnp.int32)))
  return states[0], states[1]


# ---------------------------------------------------------------------------
# The schedule of one block, per mode, and the factory.
# ---------------------------------------------------------------------------

class Multinet(NamedTuple):
  """Jitted functions of one configuration (unjitted ones are module-level)."""
  config: MultinetConfig
  init: Callable[[Array, int], tuple[NetState, NetState]]
  a_step: Callable     # (state_a, sg_params, images, targets) [dni/decoupled].
  b_step: Callable     # (state_b, messages, targets) [dni/decoupled].
  joint_step: Callable  # (state_a, state_b, block) [backprop].
  evaluate_block: Callable
  train_block: Callable  # (state_a, state_b, block) -> (a, b, metrics).


def train_block(net: Multinet, state_a: NetState, state_b: NetState,
                block: Block) -> tuple[NetState, NetState, dict[str, Array]]:
  """One block of T^2 steps under the mode's schedule (Sec. 3.3):
  `backprop` one joint update; `dni`/`decoupled` T updates of A, each over
  its T steps, then B's update over its T ticks on the T messages A sent.
  Metrics stay on device (summed wrong answers, last losses)."""
  config = net.config
  if config.mode == 'backprop':
    return net.joint_step(state_a, state_b, block)
  t = config.tick
  messages, a_losses, a_wrong = [], [], []
  for k in range(t):
    sg_params = state_b.params['sg'] if config.mode == 'dni' else None
    state_a, message, metrics = net.a_step(
        state_a, sg_params, block.images[:, k * t:(k + 1) * t],
        block.a_targets[:, k:k + 1])
    messages.append(message)
    a_losses.append(metrics['loss'])
    a_wrong.append(metrics['wrong'])
  state_b, _, metrics_b = net.b_step(
      state_b, jnp.concatenate(messages, axis=1), block.b_targets)
  return state_a, state_b, {
      'a_loss': sum(a_losses), 'b_loss': metrics_b['loss'],
      'a_wrong': sum(a_wrong), 'b_wrong': metrics_b['wrong'],
      'sg_loss': metrics_b['sg_loss'], 'sg_cosine': metrics_b['sg_cosine']}


def validate_config(config: MultinetConfig) -> None:
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


@functools.lru_cache(maxsize=8)
def make_multinet(config: MultinetConfig) -> Multinet:
  """Validates `config`; returns the jitted per-network updates (A and B are
  separately jitted; `joint_step` is the single graph of `backprop`). Cached
  per configuration, so a second run in one process does not recompile."""
  validate_config(config)
  net = Multinet(
      config=config,
      init=functools.partial(init_states, config),
      a_step=jax.jit(functools.partial(a_step, config), donate_argnums=0),
      b_step=jax.jit(functools.partial(b_step, config), donate_argnums=0),
      joint_step=jax.jit(functools.partial(joint_step, config),
                         donate_argnums=(0, 1)),
      evaluate_block=jax.jit(functools.partial(evaluate_block, config)),
      train_block=None)
  return net._replace(train_block=functools.partial(train_block, net))

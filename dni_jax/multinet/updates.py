"""The two-network system's updates and their schedule (Sec. 3.3): A's
decoupled update from a message gradient (`dni`: sg_scale * M(m); `decoupled`:
zero), B's update with M's regression onto B's true message gradients, the
joint `backprop` update, one block under each mode's schedule, and the
jitted factory `make_multinet`."""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dni_jax import interface
from dni_jax import sources
from dni_jax.multinet.config import Array
from dni_jax.multinet.config import Block
from dni_jax.multinet.config import LstmState
from dni_jax.multinet.config import MultinetConfig
from dni_jax.multinet.config import NetState
from dni_jax.multinet.config import Params
from dni_jax.multinet.config import validate_config
from dni_jax.multinet.layers import sg_model_apply
from dni_jax.multinet.layers import update_stats
from dni_jax.multinet.networks import a_forward
from dni_jax.multinet.networks import b_forward
from dni_jax.multinet.networks import classification_loss
from dni_jax.multinet.networks import evaluate_block
from dni_jax.multinet.networks import init_states
from dni_jax.multinet.networks import make_optimizer


def _apply(config: MultinetConfig, state: NetState, grads: Params,
           moments: Params, carry: LstmState) -> NetState:
  """One update of a network: each module's own optimiser step, the BN
  running averages, the carry to the next update and the update count."""
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


def sg_regression(sg_params: Params, inputs: Array, true_grad: Array
                  ) -> tuple[Array, Params, Array]:
  """M's L2 regression (weight 1, averaged over the K messages) of
  M(inputs [B, K, D]) onto `true_grad` [B, K, M]: (loss, its gradient w.r.t.
  `sg_params`, and Fig. 10's diagnostic, the cosine of M's prediction with
  the true gradient, before any update)."""
  def m_loss(params):
    prediction = sg_model_apply(params, inputs)
    return jnp.mean(jax.vmap(interface.synthetic_gradient_loss, in_axes=1)(
        prediction, true_grad)), prediction
  (loss, prediction), grads = jax.value_and_grad(m_loss, has_aux=True)(
      sg_params)
  cosine = interface.gradient_diagnostics(
      prediction.reshape(-1, prediction.shape[-1]),
      true_grad.reshape(-1, true_grad.shape[-1]))['cosine']
  return loss, grads, cosine


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
    sg_loss, grads['sg'], sg_cosine = sg_regression(
        state.params['sg'], messages_BxKxM, true_grad)
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

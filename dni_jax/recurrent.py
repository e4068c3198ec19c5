"""Recurrent DNI (Sec. 2.2, 3.2, A.3; Fig. 3, 4): truncated BPTT with
synthetic gradients at the unroll boundary, and DNI + Aux.

One training step runs the carried core state s_0 over T steps (`lax.scan`)
and gets, from one `jax.vjp` pulled back with `interface.pull_back`, the
parameter gradient of the unroll's loss and the per-example gradient w.r.t.
s_0. The gradient from the future at the boundary is 0 (`bptt`) or
sg_scale * M(y_T) (`dni`, `dni_aux`); M is trained one step later, on the
replayed previous unroll, to the gradient w.r.t. s_0 (Fig. 4). The design in
full (methods, gradient convention, replay): docs/architecture/recurrent_multinet.md.
"""

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dni_jax import functional
from dni_jax import interface
from dni_jax import losses
from dni_jax import sources
# pylint: disable=unused-import
# The settings and the cores, importable from here as before.
from dni_jax.rnn_config import (
    CORES, LOSSES, METHODS, Chunk, RecurrentConfig, validate_config)
from dni_jax.rnn_cores import (
    CoreState, Params, core_step_fn, flatten_state, init_core, leaky_rnn_step,
    lstm_step, rnn_step, split_state, unroll, zero_state)
# pylint: enable=unused-import

Array = jax.Array


class Carry(NamedTuple):
  """What crosses from one unroll to the next (replay fields: None for bptt)."""
  core: CoreState           # s_0 of the next unroll, each f32[B, H].
  replay_start: CoreState | None   # state before the last K steps.
  replay_inputs: Array | None      # the last K steps' inputs, [B, K, ...].
  replay_resets: Array | None      # f32[B, K].
  valid: Array              # f32[]: 1 once a previous boundary exists.


class RecurrentState(NamedTuple):
  params: Params            # {'core', 'readout', 'sg', 'aux'} (sg/aux: DNI only).
  opt_state: dict          # Each module's own Adam state, keyed as params.
  carry: Carry
  step: Array               # i32[].


# ---------------------------------------------------------------------------
# Heads: readout, synthetic-gradient model M, aux model A.
# ---------------------------------------------------------------------------

# M(y) (or A(y)) on [..., H] -> [..., sg_size]: linear -> ReLU -> linear, one
# hidden layer as wide as the core (A.3), final layer zero (A.1).
mlp_apply = functional.mlp_apply


def init_params(config: RecurrentConfig, key: Array) -> Params:
  k_core, k_out, k_sg, k_aux = jax.random.split(key, 4)
  params = {
      'core': init_core(k_core, config.core, config.input_size,
                        config.hidden_size),
      'readout': functional.init_linear(k_out, config.hidden_size,
                                        config.output_size),
  }
  h = config.hidden_size
  if config.method in ('dni', 'dni_aux'):
    params['sg'] = functional.init_mlp(k_sg, h, h, config.sg_size)
  if config.method == 'dni_aux':
    params['aux'] = functional.init_mlp(k_aux, h, h, config.sg_size)
  return params


def step_losses(config: RecurrentConfig, readout: Params, y: Array,
                targets: Array) -> Array:
  """Per-step loss in nats, [...]: summed over the output bits (bernoulli) or
  softmax cross-entropy (categorical)."""
  logits = functional.linear(readout, y)
  if config.loss == 'categorical':
    return losses.softmax_cross_entropy(logits, targets)
  return losses.bernoulli_cross_entropy(logits, targets)


def unroll_loss(config: RecurrentConfig, params: Params, state0: CoreState,
                chunk: Chunk) -> tuple[tuple[Array, CoreState],
                                       tuple[Array, tuple[Array, ...]]]:
  """((L, s_T), (y, states)): L = (1/B) sum_b sum_t mask * loss, in nats."""
  state_T, y, states = unroll(config, params['core'], state0, chunk.inputs,
                              chunk.resets)
  per_step = step_losses(config, params['readout'], y, chunk.targets)
  loss = jnp.sum(per_step * chunk.mask) / chunk.mask.shape[0]
  return (loss, state_T), (y, states)


# ---------------------------------------------------------------------------
# The truncated-BPTT / DNI step.
# ---------------------------------------------------------------------------

class UnrollGradients(NamedTuple):
  grads: Params              # of L + <delta_T, s_T>/B w.r.t. core and readout.
  initial_state_grad: CoreState  # per example, B * d(...)/ds_0: M's target.
  loss: Array                # L (nats, batch mean, summed over the T steps).
  final_state: CoreState     # s_T.
  outputs: Array             # y, f32[B, T, H].
  states: tuple[Array, ...]  # the state after every step, each f32[B, T, H].


def _unroll_vjp(config: RecurrentConfig, params: Params, state0: CoreState,
                chunk: Chunk) -> tuple[Array, Callable[[CoreState],
                                                   UnrollGradients]]:
  """The unroll's forward under one `jax.vjp`: (y, pull), `pull(delta_T)`
  giving the `UnrollGradients` of that boundary gradient."""
  trainable = {'core': params['core'], 'readout': params['readout']}
  fn = lambda p, s0: unroll_loss(config, p, s0, chunk)
  (loss, state_T), vjp_fn, (y, states) = jax.vjp(fn, trainable, state0,
                                                 has_aux=True)

  def pull(delta_T):
    delta_T = jax.lax.stop_gradient(tuple(delta_T))
    # L is already the batch mean: its cotangent is 1; s_T's is delta_T / B.
    grads, grad_s0 = interface.pull_back(
        lambda d: vjp_fn((jnp.ones_like(loss), d)), delta_T,
        batch_size=chunk.mask.shape[0])
    return UnrollGradients(
        grads=grads, initial_state_grad=grad_s0,
        loss=loss, final_state=state_T, outputs=y, states=states)
  return y, pull


def unroll_gradients(config: RecurrentConfig, params: Params,
                     state0: CoreState, chunk: Chunk,
                     boundary_grad: CoreState | Callable) -> UnrollGradients:
  """Eq. (3): sum_t dL_t/dtheta + delta_T ds_T/dtheta, from one vjp.

  `boundary_grad` is delta_T (per example, one array per state tensor), or a
  function of the unroll's outputs y [B, T, H] returning it (DNI: M(y_T),
  computed from the same forward pass).
  """
  y, pull = _unroll_vjp(config, params, state0, chunk)
  return pull(boundary_grad(y) if callable(boundary_grad) else boundary_grad)


def dni_losses(config: RecurrentConfig, params: Params, carry: Carry,
               sg_target: CoreState, future_sg: Array | None
               ) -> tuple[Array, tuple[Array, Array]]:
  """The synthetic-gradient loss for the previous boundary, and (DNI+Aux) the
  aux loss for the previous unroll, from the K replayed steps (Fig. 4).

  `sg_target`: this unroll's per-example gradient w.r.t. s_0. `future_sg`
  (DNI+Aux): M(y_t) at every step t of this unroll, [B, T, sg_size], the aux
  target for the previous unroll's step t (t + T steps later; a constant).
  Both losses are L2 (`interface.synthetic_gradient_loss`), weight 1; the
  aux loss is averaged over the T steps. Both are zero until a previous
  boundary exists.
  """
  core_params = params['core']
  if config.method == 'dni' and not config.sg_into_core:
    core_params = jax.lax.stop_gradient(core_params)
  _, y_rep, _ = unroll(config, core_params, carry.replay_start,
                       carry.replay_inputs, carry.replay_resets)
  y_boundary = y_rep[:, -1]
  if not config.sg_into_core:
    y_boundary = jax.lax.stop_gradient(y_boundary)
  sg_loss = carry.valid * interface.synthetic_gradient_loss(
      mlp_apply(params['sg'], y_boundary), flatten_state(sg_target))
  aux_loss = jnp.zeros((), jnp.float32)
  if config.method == 'dni_aux':
    targets = jax.lax.stop_gradient(future_sg)
    predictions = mlp_apply(params['aux'], y_rep)
    per_step = jax.vmap(interface.synthetic_gradient_loss, in_axes=1)(
        predictions, targets)
    aux_loss = carry.valid * jnp.mean(per_step)
  return sg_loss + aux_loss, (sg_loss, aux_loss)


def make_optimizer(config: RecurrentConfig) -> optax.GradientTransformation:
  return optax.adam(config.learning_rate)


def init_carry(config: RecurrentConfig, batch_size: int, example_inputs: Array
               ) -> Carry:
  """Zero state; `example_inputs` [B, T, ...] gives the replay buffer's type."""
  k = config.replay_length
  if k == 0:   # Truncated BPTT keeps nothing of the previous unroll.
    return Carry(zero_state(config, batch_size), None, None, None,
                 jnp.zeros((), jnp.float32))
  return Carry(
      core=zero_state(config, batch_size),
      replay_start=zero_state(config, batch_size),
      replay_inputs=jnp.zeros((batch_size, k) + example_inputs.shape[2:],
                              example_inputs.dtype),
      replay_resets=jnp.zeros((batch_size, k), jnp.float32),
      valid=jnp.zeros((), jnp.float32))


def init_state(config: RecurrentConfig, key: Array, batch_size: int,
               example_inputs: Array) -> RecurrentState:
  params = init_params(config, key)
  return RecurrentState(params=params,
                    opt_state=sources.init_modules(make_optimizer(config),
                                                   params),
                    carry=init_carry(config, batch_size, example_inputs),
                    step=jnp.zeros((), jnp.int32))


def train_step(config: RecurrentConfig, state: RecurrentState, chunk: Chunk
               ) -> tuple[RecurrentState, dict[str, Array]]:
  """One unroll of T steps and one Adam update (Fig. 4)."""
  params, carry = state.params, state.carry
  decoupled = config.method in ('dni', 'dni_aux')
  y, pull = _unroll_vjp(config, params, carry.core, chunk)
  future_sg = None
  if config.method == 'dni_aux':
    # M at every step of this unroll (the aux targets); its last step is the
    # boundary's synthetic gradient: M runs once over y.
    future_sg = mlp_apply(params['sg'], y)
    sg_T = future_sg[:, -1]
  elif decoupled:
    sg_T = mlp_apply(params['sg'], y[:, -1])
  if decoupled:
    out = pull(tuple(config.sg_scale * d for d in split_state(config, sg_T)))
  else:  # Truncated BPTT: delta_T = 0.
    out = pull(tuple(jnp.zeros_like(s) for s in carry.core))
  grads = dict(out.grads)
  sg_loss = aux_loss = jnp.zeros((), jnp.float32)
  if decoupled:
    dni_grads, (sg_loss, aux_loss) = jax.grad(
        lambda p: dni_losses(config, p, carry, out.initial_state_grad,
                             future_sg), has_aux=True)(params)
    grads = dict(dni_grads)   # sg, aux; its readout gradient is zero.
    grads['core'] = jax.tree.map(jnp.add, dni_grads['core'], out.grads['core'])
    grads['readout'] = out.grads['readout']
  params, opt_state = sources.apply_gradients_to_modules(
      make_optimizer(config), params, state.opt_state, grads)

  # Keep the last K steps for the next step's synthetic-gradient/aux losses.
  k = config.replay_length
  t = chunk.mask.shape[1]
  if k == 0:
    new_carry = carry._replace(core=out.final_state,
                               valid=jnp.ones((), jnp.float32))
  else:
    replay_start = (carry.core if k == t else
                    tuple(s[:, t - k - 1] for s in out.states))
    new_carry = Carry(core=out.final_state, replay_start=replay_start,
                      replay_inputs=chunk.inputs[:, t - k:],
                      replay_resets=chunk.resets[:, t - k:],
                      valid=jnp.ones((), jnp.float32))
  count = jnp.maximum(jnp.sum(chunk.mask), 1.0)
  metrics = {
      'loss': out.loss,
      # Bits per scored step (per character on PTB, per output step on copy).
      'bits': out.loss * chunk.mask.shape[0] / count / math.log(2.0),
      'sg_loss': sg_loss,
      'aux_loss': aux_loss,
      'grad_norm': optax.tree.norm(grads),
  }
  return RecurrentState(params, opt_state, new_carry, state.step + 1), metrics


def evaluate_chunk(config: RecurrentConfig, params: Params, state0: CoreState,
                   chunk: Chunk) -> tuple[CoreState, dict[str, Array]]:
  """Forward only: (s_T, {'loss_sum' in nats, 'count' of scored steps})."""
  state_T, y, _ = unroll(config, params['core'], state0, chunk.inputs,
                         chunk.resets)
  per_step = step_losses(config, params['readout'], y, chunk.targets)
  return state_T, {'loss_sum': jnp.sum(per_step * chunk.mask),
                   'count': jnp.sum(chunk.mask)}


class Recurrent(NamedTuple):
  """Jitted functions of one configuration (unjitted ones are module-level)."""
  config: RecurrentConfig
  init: Callable[[Array, int, Array], RecurrentState]
  train_step: Callable[[RecurrentState, Chunk], tuple[RecurrentState, dict]]
  evaluate_chunk: Callable[[Params, CoreState, Chunk], tuple[CoreState, dict]]


def make_recurrent(config: RecurrentConfig) -> Recurrent:
  """Validates `config` and returns its jitted init / train / eval functions.

  The train step donates its state (the carry and parameters are replaced).
  """
  validate_config(config)
  return Recurrent(
      config=config,
      init=lambda key, batch_size, example_inputs: init_state(
          config, key, batch_size, example_inputs),
      train_step=jax.jit(functools.partial(train_step, config),
                         donate_argnums=0),
      evaluate_chunk=jax.jit(functools.partial(evaluate_chunk, config)))

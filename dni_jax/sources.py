"""The per-module update core and the gradient sources of DNI interfaces.

Every independently updated module owns a `ModuleState` and is updated the same
way (Eq. 1, 2, Fig. 2 of Jaderberg et al.): it runs forward under `jax.vjp`
(`module_vjp`, `chain_vjp`), an interface above it gives a per-example gradient
of its output, and the vjps pull that gradient back (`chain_pull_back`,
`interface.pull_back`) into parameter gradients for the module's own optimiser
(`apply_gradients`) and the gradient of its input.

What the interface gives is a *gradient source*, a value in the style of an
optax `GradientTransformation`: a NamedTuple of pure functions made by a
factory that closes over its settings,

  init(rng, h, context) -> state            (h, context: an example batch)
  gradient(state, h, context) -> delta       per-example gradient for h
  update(state, h, context, target) -> (state, metrics)
  gradient_and_update(state, h, context) -> (delta, update_fn)

`target` is the gradient the source should have given (bootstrapped from the
interface above, or the true loss gradient); `metrics['sg_loss']` is the L2
error (`interface.synthetic_gradient_loss`) of the gradient given at h.
`gradient_and_update` gives the gradient and `update_fn(target)`, the same
update from the same forward pass (M(h) computed once per step); `update_fn`
is a `jax.tree_util.Partial`, a pytree, so it may leave one jitted call and
enter another. The sources: `zero` (No-Bprop), `synthetic_model` (DNI: M(h); cDNI: M(h, c)),
`stale` (the moving-average memory of Sec. 3.1) and `oracle` (a given function
of h, e.g. the true gradient). Nothing here calls `jit`; callers do.
"""

from typing import Any, Callable, NamedTuple

import jax
from jax.tree_util import Partial
import jax.numpy as jnp
import optax

from dni_jax import interface

Array = jax.Array


# ---------------------------------------------------------------------------
# One module: state, forward under vjp, optimiser step.
# ---------------------------------------------------------------------------

class ModuleState(NamedTuple):
  """Everything one independently updated module owns."""
  params: Any        # Flax params.
  batch_stats: Any   # Flax batch statistics ({} for modules without BatchNorm).
  opt_state: Any     # Its own optax state: modules never share an optimiser.


def apply_module(model, params, batch_stats, *inputs, train: bool):
  """Applies a Flax module; returns (output, batch stats after the call)."""
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
    if train:
      out, updates = model.apply(variables, *inputs, train=True,
                                 mutable=['batch_stats'])
      return out, updates['batch_stats']
  return model.apply(variables, *inputs, train=train), batch_stats


def init_module(model, tx: optax.GradientTransformation, rng: Array,
                *inputs) -> ModuleState:
  """A module's initial state (inference-mode init on example inputs)."""
  variables = model.init(rng, *inputs, train=False)
  params = variables['params']
  return ModuleState(params, variables.get('batch_stats', {}), tx.init(params))


def module_vjp(model, state: ModuleState, x: Array, *extra):
  """Training-mode forward of a module under `jax.vjp`.

  Returns `(h, vjp_fn, batch_stats)`: `vjp_fn(cotangent_of_h)` gives
  `(param_grads, grad_x)`; `batch_stats` are the statistics after this batch.
  """
  def forward(params, x):
    return apply_module(model, params, state.batch_stats, x, *extra,
                        train=True)
  h, vjp_fn, batch_stats = jax.vjp(forward, state.params, x, has_aux=True)
  return h, vjp_fn, batch_stats


def apply_gradients(tx: optax.GradientTransformation, state: ModuleState,
                    grads: Any, batch_stats: Any) -> ModuleState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return ModuleState(optax.apply_updates(state.params, updates), batch_stats,
                     opt_state)


def init_modules(tx: optax.GradientTransformation, params: dict) -> dict:
  """Each module of a dict of modules (params without batch statistics) gets
  its own optimiser state: {name: tx.init(params[name])}."""
  return {name: tx.init(p) for name, p in params.items()}


def apply_gradients_to_modules(tx: optax.GradientTransformation, params: dict,
                               opt_states: dict, grads: dict
                               ) -> tuple[dict, dict]:
  """`apply_gradients` on each module of a dict of modules, each with its own
  optimiser state (`init_modules`); returns (params, opt_states)."""
  states = {name: apply_gradients(tx, ModuleState(p, {}, opt_states[name]),
                                  grads[name], {})
            for name, p in params.items()}
  return ({name: s.params for name, s in states.items()},
          {name: s.opt_state for name, s in states.items()})


def split_opt_state(opt_state: Any, names) -> dict:
  """One optimiser state over a dict of modules (checkpoints written before
  modules had their own) -> `init_modules`' layout. Exact for element-wise
  optimisers (Adam): each module keeps its slice of every per-parameter
  statistic and a copy of the shared ones (the step count)."""
  names = set(names)
  is_modules = lambda x: isinstance(x, dict) and set(x) == names
  return {name: jax.tree.map(lambda x, n=name: x[n] if is_modules(x) else x,
                             opt_state, is_leaf=is_modules)
          for name in sorted(names)}


def single_optimizer_layout(tx: optax.GradientTransformation, state):
  """Checkpoints written when the modules of a state (`state.params`, a dict)
  shared one optimiser state: returns that layout of `state` (what such a
  checkpoint restores as) and `upgrade(restored)`, which gives it each
  module's own state (`split_opt_state`) on `state`'s devices, each in its
  own buffer (the shared step count is copied: states may be donated)."""
  def upgrade(restored):
    split = split_opt_state(restored.opt_state, restored.params)
    return restored._replace(opt_state=jax.tree.map(
        lambda x, like: jax.device_put(x, like.sharding, may_alias=False),
        split, state.opt_state))
  # Placed as `state`'s optimiser states are (replicated over a mesh, say).
  sharding = jax.tree.leaves(state.opt_state)[0].sharding
  single = jax.jit(tx.init, out_shardings=sharding)(state.params)
  return state._replace(opt_state=single), upgrade


def regress(model, tx: optax.GradientTransformation, state: ModuleState,
            inputs: tuple, target: Array):
  """One optimiser step of `model(*inputs)` towards a constant target, L2 loss
  (`interface.synthetic_gradient_loss`, weight 1, A.1).
  Returns (new_state, loss)."""
  def loss_fn(params):
    pred, batch_stats = apply_module(model, params, state.batch_stats,
                                     *inputs, train=True)
    return interface.synthetic_gradient_loss(pred, target), batch_stats
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  return apply_gradients(tx, state, grads, batch_stats), loss


# ---------------------------------------------------------------------------
# A chain of modules with no interface inside (a block).
# ---------------------------------------------------------------------------

def chain_vjp(models, states, x: Array):
  """Training-mode forward of a chain of modules under `jax.vjp`.
  Returns (outputs, vjp_fns, batch_stats), one of each per module."""
  outputs, vjps, stats = [], [], []
  for model, state in zip(models, states):
    x, vjp_fn, batch_stats = module_vjp(model, state, x)
    outputs.append(x)
    vjps.append(vjp_fn)
    stats.append(batch_stats)
  return tuple(outputs), vjps, stats


def chain_pull_back(vjps, grad_h: Array):
  """Pulls a per-example gradient of the chain's output back through every
  module. Returns (param_grads, input_grads), one per module, bottom up;
  input_grads[i] is the per-example gradient of module i's input."""
  param_grads, input_grads = [None] * len(vjps), [None] * len(vjps)
  grad = grad_h
  for i in reversed(range(len(vjps))):
    param_grads[i], grad = interface.pull_back(vjps[i], grad)
    input_grads[i] = grad
  return param_grads, input_grads


def chain_update(models, tx, states, x: Array,
                 gradient_for: Callable[[Array], Array]):
  """The one update every method uses (Eq. 1, 2 and Fig. 2).

  Updates a block -- a chain of modules with no interface inside -- from the
  gradient given at its top: every module runs forward under `jax.vjp`,
  `gradient_for(h)` gives the per-example gradient of the block's output h (a
  gradient source's, the loss gradient, ...), and the same vjps pull it back
  through the block, updating each module with the optimiser `tx`.

  Returns:
    (new_states, outputs, grad_x, grad_h): `outputs` are each module's output
    (the last is h); `grad_x` is the per-example gradient of the input x, from
    the same vjps -- the target for the gradient source below; `grad_h` is
    what `gradient_for` gave.
  """
  outputs, vjps, stats = chain_vjp(models, states, x)
  grad_h = gradient_for(outputs[-1])
  param_grads, input_grads = chain_pull_back(vjps, grad_h)
  new_states = tuple(apply_gradients(tx, state, grads, batch_stats)
                     for state, grads, batch_stats
                     in zip(states, param_grads, stats))
  return new_states, outputs, input_grads[0], grad_h


# ---------------------------------------------------------------------------
# Gradient sources.
# ---------------------------------------------------------------------------

class GradientSource(NamedTuple):
  """What an interface answers for the gradient of h (see the module doc)."""
  init: Callable[..., Any]       # (rng, h, context) -> state
  gradient: Callable[..., Array]  # (state, h, context) -> per-example delta
  update: Callable[..., tuple]   # (state, h, context, target) -> (state, metrics)
  # (state, h, context) -> (delta, update_fn); update_fn(target) = update(...).
  gradient_and_update: Callable[..., tuple]


def _error_metrics(delta: Array, target: Array) -> dict[str, Array]:
  return {'sg_loss': interface.synthetic_gradient_loss(delta, target)}


def _source(init, gradient, update) -> GradientSource:
  """A source whose update recomputes what it needs (cheap ones)."""
  def gradient_and_update(state, h, context):
    return gradient(state, h, context), Partial(update, state, h, context)
  return GradientSource(init, gradient, update, gradient_and_update)


def zero() -> GradientSource:
  """No-Bprop: the gradient is zero; nothing to learn (state `()`)."""
  def gradient(state, h, context):
    del state, context
    return jnp.zeros_like(h)
  def update(state, h, context, target):
    return state, _error_metrics(gradient(state, h, context), target)
  return _source(lambda rng, h, context: (), gradient, update)


def oracle(gradient_fn: Callable[[Array, Any], Array]) -> GradientSource:
  """A given gradient, `gradient_fn(h, context)` (e.g. the true per-example
  gradient, computed by the caller); nothing to learn (state `()`)."""
  def gradient(state, h, context):
    del state
    return gradient_fn(h, context)
  def update(state, h, context, target):
    return state, _error_metrics(gradient(state, h, context), target)
  return _source(lambda rng, h, context: (), gradient, update)


def synthetic_model(model, tx: optax.GradientTransformation) -> GradientSource:
  """DNI's learned source, delta_hat = M(h, c) (Sec. 2.1, A.1).

  `model` is a Flax module called as `model(h, context, train=...)` (e.g.
  `synthetic.SyntheticGradientMLP`; context None for unconditioned DNI, the
  one-hot label for cDNI). Its state is a `ModuleState`; the gradient is M in
  training mode (batch statistics not kept: `update` recomputes the same
  forward and keeps them); `update` regresses M(h, c) onto the target with
  the L2 loss and takes one step of `tx`. Nothing flows into h.
  `gradient_and_update` runs M forward once, under `jax.vjp`, and the update
  pulls the regression loss's gradient back through that vjp.
  """
  def init(rng, h, context):
    return init_module(model, tx, rng, h, context)
  def gradient(state, h, context):
    out, _ = apply_module(model, state.params, state.batch_stats, h, context,
                          train=True)
    return out
  def update(state, h, context, target):
    state, loss = regress(model, tx, state, (h, context), target)
    return state, {'sg_loss': loss}
  def update_from_vjp(state, delta, vjp_fn, batch_stats, target):
    loss, loss_vjp = jax.vjp(
        lambda pred: interface.synthetic_gradient_loss(pred, target), delta)
    (grads,) = vjp_fn(loss_vjp(jnp.ones_like(loss))[0])
    return (apply_gradients(tx, state, grads, batch_stats),
            {'sg_loss': loss})
  def gradient_and_update(state, h, context):
    def forward(params):
      return apply_module(model, params, state.batch_stats, h, context,
                          train=True)
    delta, vjp_fn, batch_stats = jax.vjp(forward, state.params, has_aux=True)
    return delta, Partial(update_from_vjp, state, delta, vjp_fn, batch_stats)
  return GradientSource(init, gradient, update, gradient_and_update)


class StaleGradientState(NamedTuple):
  """The stale baseline's memory for one interface."""
  average: Array   # [B, ...h]: an exponential moving average of the
                   # per-example targets seen in each batch slot.


def stale(decay: float, batch_size: int) -> GradientSource:
  """Historical-gradient baseline of Sec. 3.1, in place of M(h, c).

  Not a model of the gradient but a memory of it: the gradient given for the
  b-th example of a batch is an exponential moving average of the targets
  received for the b-th examples of *earlier* batches, so it never belongs
  to the example it is used for (as in the paper). It is trained on the same
  (bootstrapped, or true at the top) targets a synthetic-gradient model gets:
  `average <- decay * average + (1 - decay) * target`. With decay 0 a layer
  is updated with the gradient of the example in its slot one step earlier.
  """
  def init(rng, h, context):
    del rng, context
    return StaleGradientState(jnp.zeros((batch_size,) + h.shape[1:],
                                        jnp.float32))
  def gradient(state, h, context):
    del context
    # A smaller batch (the diagnostics' probe) reads the first slots.
    if h.shape[1:] != state.average.shape[1:] or h.shape[0] > batch_size:
      raise ValueError(f'the stale baseline holds gradients for batches of '
                       f'shape {state.average.shape}, got activations of shape '
                       f'{h.shape}: train with the batch size it was built for')
    return state.average[:h.shape[0]].astype(h.dtype)
  def update(state, h, context, target):
    metrics = _error_metrics(gradient(state, h, context), target)
    return (StaleGradientState(decay * state.average + (1 - decay) * target),
            metrics)
  return _source(init, gradient, update)

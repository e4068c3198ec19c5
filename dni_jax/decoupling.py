"""DNI for any module: an interface after any pure function `apply_fn(params, x) -> h`.

`decouple(apply_fn, source, tx)` returns the module's update -- forward under
`jax.vjp`, the source's per-example gradient for h, the pull-back to the
parameters and the input (`interface.pull_back`), one step of the module's own
optimiser (`sources.apply_gradients`) -- and the source's update from a target
gradient (Fig. 2 of Jaderberg et al.), built from the same core the
feed-forward networks use. A Flax module without mutable collections is
`lambda params, x: model.apply({'params': params}, x)`.

Modules compose by passing activations up and input gradients down: the
`grad_x` a module's update returns is the target for the source of the module
below it (bootstrapped), or the true gradient when the module above learns
from the loss (e.g. through `sources.oracle` of the loss gradient).
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import optax

from dni_jax import interface
from dni_jax import sources

Array = jax.Array


class DecoupledState(NamedTuple):
  """One decoupled module and the interface above it."""
  module: sources.ModuleState   # Params, {} batch stats, its optimiser state.
  source: Any                   # The gradient source's state (() if none).


class Decoupled(NamedTuple):
  """What `decouple` returns (jitted once each unless `jit=False`).

    init(rng, params, x, context=None) -> state
    update(state, x, context) -> (state, h, grad_x, delta)
        the module's update from the source's gradient `delta` for
        h = apply_fn(params, x); `grad_x` is the per-example gradient of x.
    source_update(state, h, context, target) -> (state, metrics)
        the source learns from the gradient it should have given at h
        (`metrics['sg_loss']`: the L2 error of the gradient it gave).
    gradient(state, h, context) -> delta    the source's gradient alone.
  """
  init: Callable
  update: Callable
  source_update: Callable
  gradient: Callable


def init(apply_fn, source: sources.GradientSource,
         tx: optax.GradientTransformation, rng: Array, params: Any, x: Array,
         context: Any = None) -> DecoupledState:
  """The module's optimiser state and the source's state, built on the output
  of `apply_fn(params, x)` (x: an example batch)."""
  h = apply_fn(params, x)
  return DecoupledState(sources.ModuleState(params, {}, tx.init(params)),
                        source.init(rng, h, context))


def update(apply_fn, source: sources.GradientSource,
           tx: optax.GradientTransformation, state: DecoupledState, x: Array,
           context: Any = None):
  """Forward, the source's gradient for h, pull-back, optimiser step (Eq. 1).
  Returns (state, h, grad_x, delta); the source's state is not changed."""
  h, vjp_fn = jax.vjp(apply_fn, state.module.params, x)
  delta = source.gradient(state.source, h, context)
  param_grads, grad_x = interface.pull_back(vjp_fn, delta)
  module = sources.apply_gradients(tx, state.module, param_grads,
                                   state.module.batch_stats)
  return state._replace(module=module), h, grad_x, delta


def source_update(source: sources.GradientSource, state: DecoupledState,
                  h: Array, context: Any, target: Array):
  """The source's update from `target`, the gradient h should have got."""
  source_state, metrics = source.update(state.source, h, context, target)
  return state._replace(source=source_state), metrics


def decouple(apply_fn: Callable[[Any, Array], Array],
             source: sources.GradientSource,
             tx: optax.GradientTransformation, jit: bool = True) -> Decoupled:
  """Puts a DNI interface with gradient source `source` after `apply_fn`,
  whose parameters learn with `tx`. See `Decoupled` for the functions."""
  wrap = jax.jit if jit else (lambda f: f)
  return Decoupled(
      init=functools.partial(init, apply_fn, source, tx),
      update=wrap(functools.partial(update, apply_fn, source, tx)),
      source_update=wrap(functools.partial(source_update, source)),
      gradient=wrap(source.gradient))

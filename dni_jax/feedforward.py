"""Decoupled feed-forward networks: one protocol for Bprop, No-Bprop, DNI, cDNI.

Sec. 2.1, 3.1 and A.1 of Jaderberg et al. Every method updates each block of
modules between interfaces with `sources.chain_update` from the gradient its
interface's source gives (`dni_jax.sources`: zero, a synthetic-gradient model,
the stale memory); the methods differ only in where the interfaces are and
which source they use. `make_feedforward` returns the per-block updates, each
jitted on its own, and the fused whole-network `train_step`, both composed by
the same `schedule`. Design notes: docs/architecture/feedforward.md.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dni_jax import interface
from dni_jax import sources
# pylint: disable=unused-import
# The settings and the per-block updates, importable from here as before.
from dni_jax.ff_blocks import (
    GradientSource, ModuleState, Modules, FeedForwardState, _ZERO, _apply,
    _source_state, apply_gradients, backprop_update, block_and_source_update,
    block_update, build_modules, chain_pull_back, chain_update, chain_vjp,
    context_for, finish_source_update, head_update, hidden_forward,
    hidden_update, layer_update, mean_gradients_over, module_vjp,
    synthetic_gradient, synthetic_input, synthetic_input_update,
    synthetic_update, top_block_update)
from dni_jax.ff_config import (
    DECOUPLED_METHODS, GRADIENT_MODEL_METHODS, METHODS, MODELS,
    FeedForwardConfig, learning_rate_schedule)
# pylint: enable=unused-import

Array = jax.Array


def _all_finite(tree) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l))
                            for l in jax.tree.leaves(tree)]))


def _vector(xs, dtype):
  return jnp.stack(xs) if xs else jnp.zeros((0,), dtype)


class BlockFunctions(NamedTuple):
  """The per-module functions a schedule calls (jitted or not)."""
  block_update: Callable
  top_block_update: Callable
  synthetic_update: Callable
  context: Callable
  synthetic_input: Callable
  synthetic_input_update: Callable
  block_and_source_update: Callable
  finish_source_update: Callable


def _bind_block_functions(modules: Modules) -> BlockFunctions:
  bind = lambda f: functools.partial(f, modules)
  return BlockFunctions(bind(block_update), bind(top_block_update),
                        bind(synthetic_update), bind(context_for),
                        bind(synthetic_input), bind(synthetic_input_update),
                        bind(block_and_source_update), finish_source_update)


def schedule(fns: BlockFunctions, modules: Modules, state: FeedForwardState,
             images: Array, labels: Array):
  """One training step of every method (Fig. 2).

  Each block updates as soon as the interface above it answers; the top block
  from the loss; then each synthetic-gradient model regresses to the input
  gradient that the block above it returned (bootstrapped, or true at the
  top). No block's update depends on a later block's, so the order of the
  calls is free. With synthetic inputs (complete unlock) every block above
  the first reads I_j(data) instead of the output below, and each input model
  regresses onto that output. Returns (new_state, metrics); metrics hold
  `loss`, `accuracy`, `sg_loss` and `si_loss` per interface, which blocks
  updated, and per-module finiteness flags.
  """
  unlocked = modules.synthetic_input is not None
  x = images
  context = fns.context(labels)
  new_layers = list(state.layers)
  activations, block_inputs, block_outputs, targets, grads_h = [], [], [], [], []
  # Without synthetic inputs, interface j's source learns at the h it gave a
  # gradient for: its update reuses that forward pass (M(h) once).
  source_updates = []
  for j, block in enumerate(modules.blocks[:-1]):
    if unlocked and j > 0:
      x = fns.synthetic_input(state.inputs[j - 1], images)
    block_inputs.append(x)
    sg_state = _source_state(modules, state, j)
    layer_states = tuple(state.layers[i] for i in block)
    if sg_state is None or unlocked:
      new, outputs, grad_x, grad_h = fns.block_update(
          block, layer_states, sg_state, x, context)
    else:
      new, outputs, grad_x, grad_h, update_fn = fns.block_and_source_update(
          block, layer_states, sg_state, x, context)
      source_updates.append(update_fn)
    for i, layer_state in zip(block, new):
      new_layers[i] = layer_state
    activations += outputs
    x = outputs[-1]
    block_outputs.append(x)
    grads_h.append(grad_h)
    if j > 0:
      targets.append(grad_x)  # Bootstrapped target for interface j - 1.
  top = modules.blocks[-1]
  if unlocked and len(modules.blocks) > 1:
    x = fns.synthetic_input(state.inputs[-1], images)
  block_inputs.append(x)
  new_top, head, outputs, grad_x, loss, logits = fns.top_block_update(
      top, tuple(state.layers[i] for i in top), state.head, x, labels)
  for i, layer_state in zip(top, new_top):
    new_layers[i] = layer_state
  activations += outputs
  targets.append(grad_x)      # True gradient: target for the top interface.

  # Interface j's synthetic-gradient model is trained where block j + 1 took
  # its input (the real output of block j, or its synthetic input).
  new_synthetic, sg_losses = [], []
  if modules.use_synthetic:
    for j, (sg_state, h, target) in enumerate(zip(
        state.synthetic, block_inputs[1:], targets)):
      if source_updates:
        sg_state, sg_loss = fns.finish_source_update(source_updates[j], target)
      else:
        sg_state, sg_loss = fns.synthetic_update(sg_state, h, context, target)
      new_synthetic.append(sg_state)
      sg_losses.append(sg_loss)
  new_inputs, si_losses = [], []
  if unlocked:
    for si_state, real_input in zip(state.inputs, block_outputs):
      si_state, si_loss = fns.synthetic_input_update(si_state, images,
                                                     real_input)
      new_inputs.append(si_state)
      si_losses.append(si_loss)

  num_blocks = len(modules.blocks)
  if modules.p_update < 1:
    key = jax.random.fold_in(jax.random.PRNGKey(modules.seed), state.step)
    updated = jax.random.bernoulli(key, modules.p_update, (num_blocks,))
    keep = lambda flag, new, old: jax.tree.map(
        lambda n, o: jnp.where(flag, n, o), new, old)
    for j, block in enumerate(modules.blocks):
      for i in block:
        new_layers[i] = keep(updated[j], new_layers[i], state.layers[i])
    head = keep(updated[-1], head, state.head)
    # Interface j is trained from block j + 1's backward pass.
    new_synthetic = [keep(updated[j + 1], new, old) for j, (new, old)
                     in enumerate(zip(new_synthetic, state.synthetic))]
    # An input model learns only when the block below produced its target
    # and its own block is not busy.
    new_inputs = [keep(updated[j] & updated[j + 1], new, old) for j, (new, old)
                  in enumerate(zip(new_inputs, state.inputs))]
  else:
    updated = jnp.ones((num_blocks,), jnp.bool_)
  new_state = FeedForwardState(tuple(new_layers), head, tuple(new_synthetic),
                               state.step + 1, tuple(new_inputs))
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'sg_loss': _vector(sg_losses, jnp.float32),
      'si_loss': _vector(si_losses, jnp.float32),
      'block_updated': updated,
      # Health flags, checked by the training loop. Hidden layers 1..N-1:
      # their outputs; layers 1..N: parameters after the update; interfaces
      # bottom up: the gradient each received.
      'activation_finite': _vector(
          [jnp.all(jnp.isfinite(h)) for h in activations], jnp.bool_),
      'layer_finite': _vector(
          [_all_finite(m.params) for m in new_layers + [head]], jnp.bool_),
      'synthetic_gradient_finite': _vector(
          [jnp.all(jnp.isfinite(g)) for g in grads_h], jnp.bool_),
  }
  return new_state, metrics


def train_step(modules: Modules, state: FeedForwardState, images: Array,
               labels: Array):
  """`schedule` with the unjitted functions: fuse it with one `jax.jit`."""
  return schedule(_bind_block_functions(modules), modules, state, images,
                  labels)


def synthetic_gradient_diagnostics(modules: Modules, state: FeedForwardState,
                                   images: Array, labels: Array):
  """Fig. 10: each interface's synthetic gradient against the true one.

  The true gradient is the per-example backpropagated dL/dh of the whole
  network in training mode (what a Bprop step would use). Returns arrays with
  one value per interface: `sg_l2_error`, `sg_cosine`, `sg_sign_error`.
  """
  # Nothing is updated: only the gradients are read.
  outputs, vjps, _ = chain_vjp(modules.hidden + (modules.head,),
                               state.layers + (state.head,), images)
  loss_grad = interface.softmax_cross_entropy_grad(outputs[-1], labels)[1]
  _, true_grads = chain_pull_back(vjps, loss_grad)
  context = context_for(modules, labels)
  rows = []
  for j, layer in enumerate(modules.interfaces):
    # Interface after layer k (1-based): h_k is the input of module k.
    h, true = outputs[layer - 1], true_grads[layer]
    ghat = synthetic_gradient(modules, _source_state(modules, state, j), h,
                              context)
    rows.append(interface.gradient_diagnostics(ghat, true))
  return {f'sg_{k}': _vector([r[k] for r in rows], jnp.float32)
          for k in ('l2_error', 'cosine', 'sign_error')}


def predict(modules: Modules, state: FeedForwardState, images: Array) -> Array:
  """Test-time logits: all layers connected, batch norm in inference mode."""
  x = images
  for i, layer_state in enumerate(state.layers):
    x = hidden_forward(modules, i, layer_state, x, train=False)
  logits, _ = _apply(modules.head, state.head.params, state.head.batch_stats,
                     x, train=False)
  return logits


def eval_batch(modules: Modules, state: FeedForwardState, images: Array,
               labels: Array) -> dict[str, Array]:
  """Sums (not means) over the batch, so batches of any size can be added."""
  logits = predict(modules, state, images)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1])
  nll = -jnp.sum(one_hot * jax.nn.log_softmax(logits))
  return {'loss_sum': nll,
          'num_correct': jnp.sum(jnp.argmax(logits, -1) == labels),
          'count': jnp.asarray(labels.shape[0])}


def init(modules: Modules, config: FeedForwardConfig,
         rng: Array) -> FeedForwardState:
  """Initial state. Each module's key depends only on its position, so every
  method starts from the same layer weights for the same seed."""
  x = jnp.zeros((1,) + tuple(config.input_shape), jnp.float32)
  layer_states, outputs = [], []
  for i, model in enumerate(modules.hidden):
    layer_states.append(sources.init_module(model, modules.tx,
                                     jax.random.fold_in(rng, i), x))
    x = jnp.zeros_like(hidden_forward(modules, i, layer_states[-1], x,
                                      train=False))
    outputs.append(x)
  head = sources.init_module(modules.head, modules.tx,
                      jax.random.fold_in(rng, config.num_layers - 1), x)
  synthetic_states = ()
  if config.uses_synthetic_gradients:
    context = context_for(modules, jnp.zeros((1,), jnp.int32))
    synthetic_states = tuple(
        modules.source.init(jax.random.fold_in(rng, 1000 + layer),
                            outputs[layer - 1], context)
        for layer in config.interfaces)
  input_states = ()
  if config.synthetic_inputs:
    images = jnp.zeros((1,) + tuple(config.input_shape), jnp.float32)
    input_states = tuple(
        sources.init_module(modules.synthetic_input, modules.tx,
                     jax.random.fold_in(rng, 2000 + layer), images)
        for layer in config.interfaces)
  return FeedForwardState(tuple(layer_states), head, synthetic_states,
                          jnp.zeros((), jnp.int32), input_states)


class FeedForward(NamedTuple):
  """What `make_feedforward` returns: functions closed over one configuration.

  Decoupled per-module API (each its own jit; `layer` and `layer_ids` are
  static 0-based hidden-layer indices):
    hidden_update(layer, layer_state, sg_state | None, x, context)
        -> (layer_state, h, grad_x, grad_h)
    block_update(layer_ids, layer_states, sg_state | None, x, context)
        -> (layer_states, outputs, grad_x, grad_h)
    head_update(head_state, x, labels) -> (head_state, grad_x, loss, logits)
    top_block_update(layer_ids, layer_states, head_state, x, labels)
        -> (layer_states, head_state, outputs, grad_x, loss, logits)
    synthetic_update(sg_state, h, context, target) -> (sg_state, sg_loss)
    block_and_source_update(layer_ids, layer_states, sg_state, x, context)
        -> (layer_states, outputs, grad_x, grad_h, source_update_fn)
    finish_source_update(source_update_fn, target) -> (sg_state, sg_loss)
    synthetic_gradient(sg_state, h, context) -> delta_hat
    synthetic_input(si_state, images) -> h_hat          (complete unlock)
    synthetic_input_update(si_state, images, target) -> (si_state, si_loss)
    backprop_update(layer, layer_state, x, grad_h)
        -> (layer_state, h, grad_x, grad_h)
    hidden_forward(layer, layer_state, x) -> h
    context(labels) -> one-hot labels (cDNI) or None
  Whole network:
    init(rng) -> state
    train_step(state, images, labels) -> (state, metrics)   (fused, one jit)
    eval_batch(state, images, labels) -> sums of loss / correct / count
    predict(state, images) -> logits
    diagnostics(state, images, labels) -> Fig. 10 errors per interface
  """
  config: FeedForwardConfig
  modules: Modules
  init: Callable
  train_step: Callable
  eval_batch: Callable
  predict: Callable
  diagnostics: Callable
  hidden_update: Callable
  block_update: Callable
  head_update: Callable
  top_block_update: Callable
  synthetic_update: Callable
  synthetic_gradient: Callable
  synthetic_input: Callable
  synthetic_input_update: Callable
  backprop_update: Callable
  hidden_forward: Callable
  context: Callable
  block_and_source_update: Callable
  finish_source_update: Callable


def make_feedforward(config: FeedForwardConfig, jit: bool = True,
                     donate: bool | None = None) -> FeedForward:
  """Factory: the configuration's functions, jitted once each unless `jit=False`.

  `donate` (default: on for accelerators) donates the state buffers to the
  fused `train_step`, so a step updates the network in place.
  """
  modules = build_modules(config)
  if donate is None:
    donate = jax.default_backend() != 'cpu'
  wrap = jax.jit if jit else (lambda f, **_: f)
  bind = lambda f: functools.partial(f, modules)
  static_layers = {'static_argnums': (0,)}  # Layer indices pick definitions.
  return FeedForward(
      config=config,
      modules=modules,
      init=wrap(functools.partial(init, modules, config)),
      train_step=wrap(bind(train_step), donate_argnums=(0,) if donate else ()),
      eval_batch=wrap(bind(eval_batch)),
      predict=wrap(bind(predict)),
      diagnostics=wrap(bind(synthetic_gradient_diagnostics)),
      hidden_update=wrap(bind(hidden_update), **static_layers),
      block_update=wrap(bind(block_update), **static_layers),
      head_update=wrap(bind(head_update)),
      top_block_update=wrap(bind(top_block_update), **static_layers),
      synthetic_update=wrap(bind(synthetic_update)),
      synthetic_gradient=wrap(bind(synthetic_gradient)),
      synthetic_input=wrap(bind(synthetic_input)),
      synthetic_input_update=wrap(bind(synthetic_input_update)),
      backprop_update=wrap(bind(backprop_update), **static_layers),
      hidden_forward=wrap(bind(hidden_forward), static_argnums=(0, 3)),
      context=wrap(bind(context_for)),
      block_and_source_update=wrap(bind(block_and_source_update),
                                   **static_layers),
      finish_source_update=wrap(finish_source_update),
  )


def per_layer_train_step(ff: FeedForward, state: FeedForwardState,
                         images: Array, labels: Array):
  """`schedule` driven one block at a time from Python.

  Each call is a separate jitted function, so any block could instead run on
  its own schedule, device or process. Computes the same as the fused
  `ff.train_step` (Bprop is a single block, so there it is one call).
  """
  fns = BlockFunctions(ff.block_update, ff.top_block_update,
                       ff.synthetic_update, ff.context, ff.synthetic_input,
                       ff.synthetic_input_update, ff.block_and_source_update,
                       ff.finish_source_update)
  return schedule(fns, ff.modules, state, images, labels)

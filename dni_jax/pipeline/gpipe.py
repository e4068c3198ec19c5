"""GPipe (Huang et al., 2019), the backprop-pipeline baseline, on the same
`stage` mesh as the decoupled pipeline.

The batch is split into M micro-batches that flow up (fill) and whose
gradients flow down (drain); each stage re-materialises its forward pass in
the backward pass, and applies one Adam update with the mean of the M
micro-batch gradients at the end. A stage's work is the one-device chain
update split in three: `feedforward.chain_vjp` (forward, `stage_forward`),
`feedforward.chain_pull_back` of the gradient from above (`stage_backward`)
and, once per step, `feedforward.apply_gradients` (`stage_apply`).

BatchNorm normalises each micro-batch on its own and updates its running
statistics once per micro-batch, in order; the re-materialised forward does
not move them again. This is, up to float summation order, one step of
`jax.grad` of the mean over micro-batches of each micro-batch's mean loss
(tests/test_oracle_pipeline.py), which with M > 1 is not the loss of the
whole batch normalised as one.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from dni_jax import feedforward
from dni_jax import interface
from dni_jax.pipeline import staging
from dni_jax.pipeline.staging import PipelineLayout
from dni_jax.pipeline.staging import STAGE_AXIS

Array = jax.Array


class BackpropPipelineState(NamedTuple):
  """Every leaf [S, ...], sharded over `stage`."""
  blocks: tuple   # Per stage s: (layer states,) or, on the top stage,
                  # (layer states, classifier state), placed as in
                  # `PipelineState.blocks`.
  step: Array     # [S] int32.


class BackpropPipeline(NamedTuple):
  """What `make_backprop_pipeline` returns (the fields as in `Pipeline`);
  `train_step(state, images, labels) -> (state, metrics)` is one GPipe step,
  `train_steps` K of them in one call (images [K, B, ...])."""
  config: feedforward.FeedForwardConfig
  modules: feedforward.Modules
  stages: tuple[tuple[int, ...], ...]
  num_microbatches: int
  mesh: jax.sharding.Mesh
  init: Callable
  from_feedforward: Callable
  to_feedforward: Callable
  train_step: Callable
  train_steps: Callable
  eval_batch: Callable
  train_step_local: Callable


def backprop_stages(config: feedforward.FeedForwardConfig,
                    boundaries: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  """Hidden layers (0-based) per stage of `config`'s network cut after the
  1-based layers `boundaries` (as `dni_layers`): the blocks the same network
  has with interfaces there."""
  return dataclasses.replace(config, method='no_bprop',
                             dni_layers=tuple(boundaries)).blocks


def _stage_input(layout: PipelineLayout, s: int, images_mb, x_flat):
  if s == 0:
    return images_mb
  return staging.unflatten_examples(x_flat, layout.input_shapes[s])


def stage_forward(modules, layout: PipelineLayout, s: int, block, images_mb,
                  labels_mb, x_flat):
  """Forward of stage s (static) on one micro-batch: (block with the new
  BatchNorm statistics, h_flat, loss: zero below the top)."""
  top = s == len(layout.stages) - 1
  states = staging.block_states(block)
  outputs, _, stats = feedforward.chain_vjp(
      staging.stage_models(modules, layout.stages, s), states,
      _stage_input(layout, s, images_mb, x_flat))
  block = staging.block_of(
      [st._replace(batch_stats=b) for st, b in zip(states, stats)], top)
  if top:
    loss, _ = interface.softmax_cross_entropy_grad(outputs[-1], labels_mb)
    return (block, jnp.zeros((labels_mb.shape[0], layout.width), jnp.float32),
            loss)
  return (block, staging.flatten_examples(outputs[-1], layout.width),
          jnp.zeros((), jnp.float32))


def stage_backward(modules, layout: PipelineLayout, s: int, block, grads,
                   images_mb, labels_mb, x_flat, g_flat):
  """Re-materialised forward and backward of stage s on one micro-batch,
  from the gradient its successor sent (the top stage: the loss gradient).
  Returns (grads + this micro-batch's, grad_x_flat)."""
  outputs, vjps, _ = feedforward.chain_vjp(
      staging.stage_models(modules, layout.stages, s),
      staging.block_states(block), _stage_input(layout, s, images_mb, x_flat))
  if s == len(layout.stages) - 1:
    grad_h = interface.softmax_cross_entropy_grad(outputs[-1], labels_mb)[1]
  else:
    grad_h = staging.unflatten_examples(g_flat, layout.output_shapes[s])
  param_grads, input_grads = feedforward.chain_pull_back(vjps, grad_h)
  grads = jax.tree.map(jnp.add, grads, list(param_grads))
  if s == 0:
    return grads, jnp.zeros((labels_mb.shape[0], layout.width), jnp.float32)
  return grads, staging.flatten_examples(input_grads[0], layout.width)


def stage_apply(tx, num_microbatches: int, top: bool, block, grads):
  """One Adam step per module of a stage with the mean micro-batch
  gradient."""
  return staging.block_of([
      feedforward.apply_gradients(
          tx, st, jax.tree.map(lambda g: g / num_microbatches, g),
          st.batch_stats)
      for st, g in zip(staging.block_states(block), grads)], top)


def gpipe_step_local(modules, layout: PipelineLayout, num_microbatches: int,
                     state: BackpropPipelineState, images, labels):
  """One GPipe step on one stage (the per-device program; call under
  shard_map): fill, drain, apply. Returns (state, {'loss': [1]}), the loss
  non-zero on the top stage only."""
  M, S = num_microbatches, len(layout.stages)
  s = lax.axis_index(STAGE_AXIS)
  local = staging.squeeze(state)
  mb = labels.shape[0] // M
  images_mb = images.reshape((M, mb) + images.shape[1:])
  labels_mb = labels.reshape(M, mb)
  ticks = M + S - 1
  zeros = jnp.zeros((mb, layout.width), jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  forward = functools.partial(stage_forward, modules, layout)

  def micro_batch(ticks_behind):
    """The micro-batch stage s works on (clipped), and whether it is one."""
    m = ticks_behind
    return jnp.clip(m, 0, M - 1), (m >= 0) & (m < M)

  # Fill: on tick f stage s runs micro-batch f - s forward.
  def forward_tick(carry, f):
    blocks, x_flat, stash, loss_sum = carry
    mc, valid = micro_batch(f - s)
    blocks, (h_flat, loss) = staging.update_own_stage(
        s, valid, forward, lambda block, *_: (block, zeros, zero), blocks,
        images_mb[mc], labels_mb[mc], x_flat)
    stash = stash.at[mc].set(jnp.where(valid, x_flat, stash[mc]))
    x_flat = lax.ppermute(h_flat, STAGE_AXIS, staging.shift_up(S))
    return (blocks, x_flat, stash, loss_sum + loss), None

  stash = jnp.zeros((M, mb, layout.width), jnp.float32)
  (blocks, _, stash, loss_sum), _ = lax.scan(
      forward_tick, staging.mark_varying((local.blocks, zeros, stash, zero)),
      jnp.arange(ticks))

  # Drain: on tick b stage s runs micro-batch b - (S - 1 - s) backward.
  def backward(k, acc, *args):
    return stage_backward(modules, layout, k, blocks[k], acc, *args)

  def backward_tick(carry, b):
    grads, g_flat = carry
    mc, valid = micro_batch(b - (S - 1 - s))
    grads, (grad_x,) = staging.update_own_stage(
        s, valid, backward, lambda acc, *_: (acc, zeros), grads,
        images_mb[mc], labels_mb[mc], stash[mc], g_flat)
    return (grads, lax.ppermute(grad_x, STAGE_AXIS,
                                staging.shift_down(S))), None

  grads0 = tuple(jax.tree.map(jnp.zeros_like, [
      m.params for m in staging.block_states(block)]) for block in blocks)
  (grads, _), _ = lax.scan(backward_tick,
                           staging.mark_varying((grads0, zeros)),
                           jnp.arange(ticks))
  blocks = tuple(
      lax.cond(s == k,
               staging.varying(functools.partial(stage_apply, modules.tx, M,
                                                 k == S - 1)),
               staging.varying(lambda block, _: block), blocks[k], grads[k])
      for k in range(S))
  return (staging.expand(BackpropPipelineState(blocks, local.step + 1)),
          staging.expand({'loss': loss_sum / M}))


def make_backprop_pipeline(config: feedforward.FeedForwardConfig,
                           mesh: jax.sharding.Mesh, batch_size: int,
                           boundaries: tuple[int, ...], num_microbatches: int,
                           jit: bool = True,
                           donate: bool | None = None) -> BackpropPipeline:
  """GPipe over `mesh` (axis `stage`) for a Bprop network `config`; stage s
  ends after layer `boundaries[s]` (1-based)."""
  if config.method != 'bprop':
    raise ValueError(f'the backprop pipeline trains method=bprop networks, '
                     f'not {config.method}')
  stages = backprop_stages(config, boundaries)
  num_stages = len(stages)
  if mesh.shape.get(STAGE_AXIS) != num_stages:
    raise ValueError(f'{num_stages} stages but the mesh is {dict(mesh.shape)}')
  M = num_microbatches
  if M < 1 or batch_size % M:
    raise ValueError(f'num_microbatches={M} must divide batch_size='
                     f'{batch_size}')
  modules = feedforward.build_modules(config)
  init_ff = functools.partial(feedforward.init, modules, config)
  layout = staging.stage_layout(config, modules, stages, batch_size)
  stage_spec = jax.P(STAGE_AXIS)
  train_step_local = functools.partial(gpipe_step_local, modules, layout, M)

  def train_steps_local(state, images, labels):
    state, per_stage = lax.scan(
        lambda st, batch: train_step_local(st, *batch), state,
        (images, labels))
    return state, staging.from_top_stage(num_stages,
                                         per_stage['loss'][:, 0])[None]

  def one_step_local(state, images, labels):
    state, per_stage = train_step_local(state, images, labels)
    return state, staging.from_top_stage(num_stages, per_stage['loss'])[None]

  def run_local(local_fn, state, images, labels):
    new_state, loss = jax.shard_map(
        local_fn, mesh=mesh, in_specs=(stage_spec, jax.P(), jax.P()),
        out_specs=(stage_spec, stage_spec))(state, images, labels)
    return new_state, staging.same_on_every_stage(mesh, loss)

  def train_steps(state, images, labels):
    new_state, loss = run_local(train_steps_local, state, images, labels)
    return new_state, {'loss': loss}

  def train_step(state, images, labels):
    new_state, loss = run_local(one_step_local, state, images, labels)
    return new_state, {'loss': loss[0]}

  def stack(ff_state):
    blocks, _ = staging.stage_trees(stages, ff_state)
    return BackpropPipelineState(
        staging.place_stages(blocks),
        jnp.full((num_stages,), ff_state.step, jnp.int32))

  def from_feedforward(ff_state):
    """An empty pipeline holding `ff_state`'s modules (host round trip, so it
    works across processes)."""
    return staging.on_stages(mesh, jax.jit(stack)(ff_state))

  def init(rng):
    return from_feedforward(jax.jit(init_ff)(rng))

  def to_feedforward(state):
    return staging.merge_stages(stages, staging.slice_stages(state.blocks),
                                (), state.step[0])

  def eval_batch(state, images, labels):
    return feedforward.eval_batch(modules, to_feedforward(state), images,
                                  labels)

  wrap, donating = staging.jit_or_not(jit), staging.donation(donate)
  return BackpropPipeline(
      config=config, modules=modules, stages=stages, num_microbatches=M,
      mesh=mesh, init=init, from_feedforward=from_feedforward,
      to_feedforward=wrap(to_feedforward),
      train_step=wrap(train_step, **donating),
      train_steps=wrap(train_steps, **donating), eval_batch=wrap(eval_batch),
      train_step_local=train_step_local)

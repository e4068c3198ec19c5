"""The decoupled DNI pipeline as one SPMD program (beyond the paper).

Stage s holds one block of a DNI network on its own device along a `stage`
mesh axis; every tick every stage works at once:

  1. stage s takes the activation its predecessor produced on the previous
     tick (stage 0: this tick's data) and updates its block from the
     synthetic gradient of its own model M_s (`stage_block_phase`; the top
     stage from the loss);
  2. `lax.ppermute` passes every stage's output h up one stage, and the input
     gradient each stage pulled back (the bootstrapped target, Fig. 2) down;
  3. stage s regresses M_s onto the target it just received, at the
     activation it sent on the previous tick (`stage_synthetic_phase`).

While the pipeline fills (the first S-1 ticks), stages without a real input
keep their state. The phases are shared with the per-stage (MPMD) pipeline
(`per_stage.py`); the layout, staleness and cost are discussed in
docs/architecture/pipeline.md.
"""

import functools
from typing import Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from dni_jax import feedforward
from dni_jax.pipeline import staging
from dni_jax.pipeline.staging import PipelineLayout
from dni_jax.pipeline.staging import STAGE_AXIS

Array = jax.Array
ModuleState = feedforward.ModuleState


class PipelineState(NamedTuple):
  """State of an S-stage decoupled pipeline. Every leaf has a leading stage
  axis [S, ...], sharded over the mesh's `stage` axis (B: batch size, D: the
  widest interface, flattened)."""
  blocks: tuple     # Per stage s: (layer states,) or, on the top stage,
                    # (layer states, classifier state); real at index s of
                    # the stage axis, zero placeholders elsewhere.
  synthetic: tuple  # Per stage s: the synthetic-gradient model on its output
                    # interface (() on the top stage); likewise placed.
  inputs: Array                # [S, B, D]: what the stage reads next tick, its
                               # predecessor's last output (stage 0: unused).
  input_labels: Array          # [S, B] int32: their labels.
  input_valid: Array           # [S] bool: a real batch (false while filling).
  outputs: Array               # [S, B, D]: the stage's output last tick, where
                               # its synthetic-gradient model is regressed
                               # once the target for it arrives.
  output_labels: Array         # [S, B] int32.
  output_valid: Array          # [S] bool.
  step: Array                  # [S] int32: ticks taken.


class Pipeline(NamedTuple):
  """What `make_pipeline` returns.

    init(rng) -> PipelineState             (the same weights as ff.init(rng))
    from_feedforward(ff_state) -> PipelineState   (empty pipeline)
    to_feedforward(state) -> FeedForwardState
    tick(state, images, labels) -> (state, metrics)  (a train_step; loss and
        accuracy of the top stage, the other metrics per stage [S], left
        where each stage computed them: `staging.interface_metrics` gives
        the fused step's per-interface view)
    ticks(state, images_KxB, labels_KxB) -> (state, metrics with a leading
        K axis): K ticks in one call, exactly K calls of `tick`
    eval_batch(state, images, labels) -> sums   (all layers connected)
  `tick_local` is the per-device program of one tick (under `shard_map`).
  """
  config: feedforward.FeedForwardConfig
  modules: feedforward.Modules
  layout: PipelineLayout
  mesh: jax.sharding.Mesh
  init: Callable
  from_feedforward: Callable
  to_feedforward: Callable
  tick: Callable
  ticks: Callable
  eval_batch: Callable
  tick_local: Callable


def check_dni_config(config: feedforward.FeedForwardConfig):
  """Refuses a config the decoupled pipeline does not run (train_ff.py
  checks its flags with it too)."""
  if config.method not in feedforward.DECOUPLED_METHODS:
    raise ValueError(f'the decoupled pipeline needs method dni or cdni, not '
                     f'{config.method}')
  if config.synthetic_inputs or config.p_update < 1:
    raise ValueError('the decoupled pipeline does not implement '
                     'synthetic_inputs or p_update < 1')
  if len(config.blocks) < 2:
    raise ValueError('the decoupled pipeline needs at least one interface '
                     '(two stages)')


def stage_block_phase(modules, layout: PipelineLayout, s: int, block,
                      synthetic_state, images, labels, x_flat, x_labels):
  """Phase 1 of a tick on stage s (static): the stage's block update.

  `block` and `synthetic_state` are stage s's own trees (no stage axis).
  Stage 0 reads the data, the others the activation received last tick. Below
  the top, the gradient source is the stage's own synthetic-gradient model
  (`feedforward.block_update`); the top stage learns from the loss
  (`feedforward.top_block_update`). Returns (block, h_flat, grad_x_flat,
  labels, metrics): h and the input gradient flattened to [B, D] (zeros where a
  stage has no successor or predecessor).
  """
  num_stages = len(layout.stages)
  stage = layout.stages[s]
  batch = labels.shape[0]
  if s == 0:
    x, y = images, labels
  else:
    x = staging.unflatten_examples(x_flat, layout.input_shapes[s])
    y = x_labels
  zeros = jnp.zeros((batch, layout.width), jnp.float32)
  if s < num_stages - 1:
    new_layers, outputs, grad_x, grad_h = feedforward.block_update(
        modules, stage, block[0], synthetic_state, x,
        feedforward.context_for(modules, y))
    new_block = (new_layers,)
    h_flat = staging.flatten_examples(outputs[-1], layout.width)
    loss = accuracy = jnp.zeros((), jnp.float32)
    grad_finite = jnp.all(jnp.isfinite(grad_h))
  else:
    new_layers, head, outputs, grad_x, loss, logits = (
        feedforward.top_block_update(modules, stage, block[0], block[1], x, y))
    new_block = (new_layers, head)
    h_flat = zeros
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y).astype(jnp.float32)
    grad_finite = jnp.ones((), jnp.bool_)
  grad_flat = zeros if s == 0 else staging.flatten_examples(grad_x,
                                                            layout.width)
  metrics = {
      'loss': loss, 'accuracy': accuracy,
      'activation_finite': jnp.all(jnp.stack(
          [jnp.all(jnp.isfinite(h)) for h in outputs] or
          [jnp.ones((), jnp.bool_)])),
      'layer_finite': jnp.all(jnp.stack([
          jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(
              [m.params for m in jax.tree.leaves(
                  new_block, is_leaf=lambda m: isinstance(m, ModuleState))])])),
      'synthetic_gradient_finite': grad_finite,
  }
  return new_block, h_flat, grad_flat, y, metrics


def stage_synthetic_phase(modules, layout: PipelineLayout, s: int,
                          synthetic_state, h_flat, h_labels, target_flat):
  """Phase 3 of a tick on stage s: regress the stage's synthetic-gradient
  model onto the target its successor just pulled back, at the activation the
  stage sent last tick (`feedforward.synthetic_update`). The top stage has no
  model. Returns (synthetic_state, sg_loss)."""
  if s == len(layout.stages) - 1:
    return synthetic_state, jnp.zeros((), jnp.float32)
  shape = layout.output_shapes[s]
  return feedforward.synthetic_update(
      modules, synthetic_state, staging.unflatten_examples(h_flat, shape),
      feedforward.context_for(modules, h_labels),
      staging.unflatten_examples(target_flat, shape))


def skip_metrics():
  """The metrics of a stage that did not update (flags healthy)."""
  zero, true = jnp.zeros((), jnp.float32), jnp.ones((), jnp.bool_)
  return {'loss': zero, 'accuracy': zero, 'activation_finite': true,
          'layer_finite': true, 'synthetic_gradient_finite': true}


def pipeline_tick_local(modules, layout: PipelineLayout, state: PipelineState,
                        images: Array, labels: Array):
  """One tick on one stage (the per-device program; call under shard_map).

  `state` holds this stage's slice (leading axis of size 1); images and labels
  are this tick's batch (read by stage 0). Returns (state, per-stage metrics).
  Stage k's modules are updated under `lax.cond(stage == k, update, keep)`
  (`staging.update_own_stage`).
  """
  num_stages = len(layout.stages)
  s = lax.axis_index(STAGE_AXIS)
  local = staging.squeeze(state)
  valid = local.input_valid | (s == 0)
  batch = labels.shape[0]
  zeros = jnp.zeros((batch, layout.width), jnp.float32)

  # 1. Every stage updates its block at once from its synthetic gradient.
  def update(k, block):
    return stage_block_phase(modules, layout, k, block, local.synthetic[k],
                             images, labels, local.inputs, local.input_labels)
  def keep(block):
    return block, zeros, zeros, local.input_labels, skip_metrics()
  blocks, (h_flat, grad_flat, y, metrics) = staging.update_own_stage(
      s, valid, update, keep, local.blocks)

  # 2. Activations (with their labels) go up, input gradients (with the top
  # stage's loss and accuracy) go down.
  width = layout.width
  from_below, from_above = staging.exchange(
      num_stages, s, staging.message(h_flat, y, valid),
      jnp.concatenate([grad_flat, staging.column(metrics['loss'], batch),
                       staging.column(metrics['accuracy'], batch)], axis=1))
  inputs, input_labels, input_valid = staging.read_message(from_below, width)
  inputs = jnp.where(s > 0, inputs, 0.0)   # Stage 0 reads the data.
  input_valid = input_valid & (s > 0)
  target = from_above[:, :width]
  # With two stages both now hold the top stage's loss and accuracy.
  top = jnp.where(s == num_stages - 1,
                  jnp.stack([metrics['loss'], metrics['accuracy']]),
                  from_above[0, width:])

  # 3. The synthetic-gradient model regresses onto the target just received,
  # at the activation it was computed from (sent by this stage last tick).
  has_target = local.output_valid & (s < num_stages - 1)
  def regress(k, sg_state):
    return stage_synthetic_phase(modules, layout, k, sg_state, local.outputs,
                                 local.output_labels, target)
  def keep_model(sg_state):
    return sg_state, jnp.zeros((), jnp.float32)
  synthetic, (sg_loss,) = staging.update_own_stage(   # The top stage: ().
      s, has_target, regress, keep_model, local.synthetic)

  new_local = PipelineState(
      blocks=tuple(blocks), synthetic=tuple(synthetic), inputs=inputs,
      input_labels=input_labels, input_valid=input_valid, outputs=h_flat,
      output_labels=y, output_valid=valid, step=local.step + 1)
  metrics = dict(metrics, sg_loss=sg_loss, updated=valid,
                 sg_updated=has_target, top=top)
  return staging.expand(new_local), staging.expand(metrics)


def _top_metrics(num_stages: int, per_stage: dict[str, Array]) -> Array:
  """[K, 2]: the top stage's loss and accuracy per tick. With two stages
  every stage holds them already (`pipeline_tick_local`: same bits, varying
  only in type); with more, one all-reduce per call."""
  if num_stages == 2:
    return per_stage['top'][:, 0]
  return staging.from_top_stage(num_stages, jnp.concatenate(
      [per_stage['loss'], per_stage['accuracy']], axis=1))


def pipeline_ticks_local(modules, layout: PipelineLayout, state: PipelineState,
                         images: Array, labels: Array):
  """K ticks on one stage (under shard_map): `lax.scan` of
  `pipeline_tick_local` over images [K, B, ...] and labels [K, B]. Returns
  (state, per-stage metrics [K, 1] each, top [1, K, 2]: the top stage's loss
  and accuracy, the same on every stage)."""
  state, per_stage = lax.scan(
      lambda st, batch: pipeline_tick_local(modules, layout, st, *batch),
      state, (images, labels))
  return state, per_stage, _top_metrics(len(layout.stages), per_stage)[None]


def make_pipeline(config: feedforward.FeedForwardConfig,
                  mesh: jax.sharding.Mesh, batch_size: int, jit: bool = True,
                  donate: bool | None = None) -> Pipeline:
  """The decoupled pipeline of `config` on `mesh` (axis `stage`): one stage
  per block of `config` (its interfaces are the stage boundaries). `donate`
  (default: on for accelerators) donates the state to `tick` and `ticks`."""
  check_dni_config(config)
  num_stages = len(config.blocks)
  if mesh.shape.get(STAGE_AXIS) != num_stages:
    raise ValueError(f'config has {num_stages} blocks (stages) but the mesh '
                     f'axis {STAGE_AXIS!r} is {dict(mesh.shape)}')
  modules = feedforward.build_modules(config)
  init_ff = functools.partial(feedforward.init, modules, config)
  layout = staging.pipeline_layout(config, modules, batch_size)
  stage_spec = jax.P(STAGE_AXIS)

  stack = jax.jit(functools.partial(staging.stack_stages, layout))

  def from_feedforward(ff_state) -> PipelineState:
    """An empty pipeline holding `ff_state`'s modules (a host round trip, so
    it works across processes)."""
    blocks, synth = stack(ff_state)
    S, B, D = num_stages, batch_size, layout.width
    return staging.on_stages(mesh, PipelineState(
        blocks=blocks, synthetic=synth,
        inputs=jnp.zeros((S, B, D), jnp.float32),
        input_labels=jnp.zeros((S, B), jnp.int32),
        input_valid=jnp.zeros((S,), jnp.bool_),
        outputs=jnp.zeros((S, B, D), jnp.float32),
        output_labels=jnp.zeros((S, B), jnp.int32),
        output_valid=jnp.zeros((S,), jnp.bool_),
        step=jnp.full((S,), ff_state.step, jnp.int32)))

  def init(rng):
    return from_feedforward(jax.jit(init_ff)(rng))

  def to_feedforward(state: PipelineState) -> feedforward.FeedForwardState:
    return staging.unstack_stages(layout, state.blocks, state.synthetic,
                                  state.step[0])

  tick_local = functools.partial(pipeline_tick_local, modules, layout)

  def run_local(local_fn, state, images, labels):
    """`local_fn` under shard_map; metrics in `training.fit`'s contract
    with a leading K axis."""
    new_state, per_stage, top = jax.shard_map(
        local_fn, mesh=mesh, in_specs=(stage_spec, jax.P(), jax.P()),
        out_specs=(stage_spec, jax.P(None, STAGE_AXIS), stage_spec))(
            state, images, labels)
    return new_state, staging.tick_metrics(
        per_stage, staging.same_on_every_stage(mesh, top))

  def one_tick_local(state, images, labels):
    state, per_stage = tick_local(state, images, labels)
    per_stage = staging.expand(per_stage)   # [K=1, 1]
    return state, per_stage, _top_metrics(num_stages, per_stage)[None]

  def ticks(state, images, labels):
    return run_local(functools.partial(pipeline_ticks_local, modules, layout),
                     state, images, labels)

  def tick(state, images, labels):
    new_state, metrics = run_local(one_tick_local, state, images, labels)
    return new_state, jax.tree.map(lambda m: m[0], metrics)

  def eval_batch(state, images, labels):
    return feedforward.eval_batch(modules, to_feedforward(state), images,
                                  labels)

  wrap, donating = staging.jit_or_not(jit), staging.donation(donate)
  return Pipeline(
      config=config, modules=modules, layout=layout, mesh=mesh, init=init,
      from_feedforward=from_feedforward,
      to_feedforward=wrap(to_feedforward), tick=wrap(tick, **donating),
      ticks=wrap(ticks, **donating), eval_batch=wrap(eval_batch),
      tick_local=tick_local)

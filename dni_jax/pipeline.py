"""The decoupled pipeline (beyond the paper) and its backprop-pipeline baseline.

DNI removes the update lock (Sec. 2): a block updates as soon as the
synthetic-gradient model on its output interface answers. Placing the blocks
of a DNI network on different devices -- *stages* along a `stage` mesh axis --
turns that into parallel speed. Every tick every stage works at once:

  1. stage s takes the activation its predecessor produced on the previous tick
     (stage 0: this tick's data) and calls the same `feedforward.block_update`
     as the one-device step, with the synthetic gradient of its own model M_s
     (the top stage: `top_block_update`, from the loss);
  2. `lax.ppermute` passes every stage's output h up one stage, and the input
     gradient each stage pulled back (the bootstrapped target, Fig. 2) down
     one stage;
  3. stage s regresses M_s (`feedforward.synthetic_update`) onto the target it
     just received, at the activation it sent on the previous tick -- which
     is exactly the input that target was computed at.

No stage waits for a backward pass. The price is staleness: stage s works on
the batch stage 0 saw s ticks earlier, with an input computed by parameters
one tick older than its predecessor's current ones. While the pipeline fills
(the first S-1 ticks), stages without a real input keep their state.

`backprop_pipeline` is the GPipe baseline on the same mesh (Huang et al., 2019):
the batch is split into M micro-batches that flow up (fill) and whose
gradients flow down (drain); each stage re-materialises its forward pass in
the backward pass, as GPipe does, and applies one Adam update with the mean
of the M micro-batch gradients at the end. BatchNorm normalises each
micro-batch on its own and updates its running statistics once per
micro-batch, in order. This equals, up to float summation order, one step of
`jax.grad` of the mean over micro-batches of each micro-batch's mean loss
(tests/test_oracle_pipeline.py), which with M > 1 is not the loss of the
whole batch normalised as one.

SPMD layout: under `shard_map` every device runs one program, but stages
differ (the first reads the images, the top one holds the classifier). The
state therefore holds, for every stage s, its own pytree of module states
(unpacked: each module keeps its Flax structure), every leaf with a leading
stage axis [S, ...] sharded over `stage`: device s holds the real values of
stage s and zero placeholders of the other stages' modules. The tick updates
stage k's modules under `lax.cond(axis_index('stage') == k, update, keep)`,
one cond per stage: the update calls the per-module functions of
`dni_jax.feedforward`; elsewhere the placeholders stay untouched, in place.
With two stages, one cyclic `ppermute` per tick carries both directions. Exact, and any network the
feedforward protocol supports can be staged this way. The price is memory:
every device holds a placeholder the size of every other stage's state (S
times the state in all). An earlier layout packed each stage into one flat
zero-padded buffer per dtype instead, which costs no placeholders, but the
unpacking and re-packing copied the whole state (parameters and both Adam
moments) every tick and doubled a stage's compute at 1000 units
(docs/PERFORMANCE.md). Activations crossing stages are flattened per example
and padded to the widest interface; their labels and validity flag travel in
the same message.

`ticks` runs K ticks in one call (`lax.scan` over K batches inside the one
`shard_map`), so the host dispatches and synchronises once per K batches; it
computes exactly what K calls of `tick` compute (tests/test_pipeline.py). (Over
gloo on CPU, collectives inside the scan's loop measured slower than K calls:
docs/PERFORMANCE.md.)

The same code runs over fake CPU devices, one process per pinned CPU core
(`scripts/benchmark.py --suite=pipeline --processes=N`), or real accelerators
on one or many hosts: only the mesh's devices differ.
"""

import functools
import itertools
import math
from typing import Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from dni_jax import feedforward
from dni_jax import interface

Array = jax.Array
STAGE_AXIS = 'stage'
ModuleState = feedforward.ModuleState


# ---------------------------------------------------------------------------
# Stage-stacked states and the messages between stages.
# ---------------------------------------------------------------------------

def place_stage(tree, s: int, num_stages: int):
  """Stage s's pytree with a leading stage axis [S, ...]: its own values at
  index s, zero placeholders at the other stages."""
  return jax.tree.map(
      lambda x: jnp.zeros((num_stages,) + x.shape, x.dtype).at[s].set(x), tree)


def stage_slice(tree, s: int):
  """Inverse of `place_stage`: row s of every leaf."""
  return jax.tree.map(lambda x: x[s], tree)


def _flatten_examples(x: Array, width: int) -> Array:
  """[B, ...] -> [B, width], zero-padded (activations crossing stages)."""
  flat = x.reshape(x.shape[0], -1)
  return jnp.pad(flat, ((0, 0), (0, width - flat.shape[1])))


def _unflatten_examples(flat: Array, shape: tuple[int, ...]) -> Array:
  return flat[:, :math.prod(shape)].reshape((flat.shape[0],) + shape)


def _message(h_flat: Array, labels: Array, valid: Array) -> Array:
  """What a stage sends up: [B, D + 2] float32, the activation, its labels
  (as floats: exact below 2**24) and the validity flag in one message."""
  return jnp.concatenate([h_flat, _column(labels, h_flat.shape[0]),
                          _column(valid, h_flat.shape[0])], axis=1)


def _read_message(message: Array, width: int):
  """Inverse of `_message`: (h_flat, labels, valid)."""
  return (message[:, :width], message[:, width].astype(jnp.int32),
          message[0, width + 1] > 0)


def _column(x: Array, batch: int) -> Array:
  """[B] or a scalar -> [B, 1] float32."""
  return jnp.broadcast_to(x.astype(jnp.float32).reshape(-1, 1), (batch, 1))


def _exchange(num_stages: int, s: Array, up_message: Array,
              down_message: Array):
  """Sends `up_message` one stage up and `down_message` one stage down (equal
  shapes); returns (from_below, from_above). Both are cyclic shifts, so in
  each collective every device sends and receives: over gloo a one-way
  permute, where one side only waits, measured several times slower. With two
  stages both directions are the same shift: one collective per tick. What
  wraps around (stage 0 from the top, the top from stage 0) is no message and
  must be ignored."""
  up = [(i, (i + 1) % num_stages) for i in range(num_stages)]
  if num_stages == 2:
    received = lax.ppermute(jnp.where(s == 0, up_message, down_message),
                            STAGE_AXIS, up)
    return received, received
  down = [(i, (i - 1) % num_stages) for i in range(num_stages)]
  return (lax.ppermute(up_message, STAGE_AXIS, up),
          lax.ppermute(down_message, STAGE_AXIS, down))


def _same_on_every_stage(mesh, x: Array) -> Array:
  """[S, ...] holding the same bits on every stage -> one replicated [...]
  value, with no collective (each device keeps its own copy; `check_vma` off
  because JAX cannot know they are equal)."""
  return jax.shard_map(lambda v: v[0], mesh=mesh, in_specs=jax.P(STAGE_AXIS),
                       out_specs=jax.P(), check_vma=False)(x)


def stage_mesh(num_stages: int, devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis `stage` over the first `num_stages` devices."""
  devices = jax.devices() if devices is None else devices
  if len(devices) < num_stages:
    raise ValueError(f'{num_stages} stages need {num_stages} devices; '
                     f'{len(devices)} are available')
  return jax.make_mesh((num_stages,), (STAGE_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:num_stages])


def balanced_interfaces(num_layers: int, num_stages: int, layer_costs,
                        interface_cost: float = 0.0) -> tuple[int, ...]:
  """Stage boundaries (1-based layers followed by an interface, as
  `dni_layers`) minimising the cost of the slowest stage. `layer_costs[i]` is
  the cost of layer i + 1 (layer `num_layers`, the classifier, is always in
  the top stage); every stage below the top also pays `interface_cost` (its
  synthetic-gradient model)."""
  if not 2 <= num_stages <= num_layers:
    raise ValueError(f'{num_stages} stages do not fit {num_layers} layers '
                     '(2 to num_layers stages)')
  best = None
  for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
    bounds = (0,) + cuts + (num_layers,)
    slowest = max(sum(layer_costs[a:b]) + (interface_cost if b < num_layers
                                           else 0.0)
                  for a, b in zip(bounds, bounds[1:]))
    if best is None or slowest < best[0]:
      best = (slowest, cuts)
  return best[1]


def fcn_costs(config: feedforward.FeedForwardConfig):
  """Multiply-adds per example of a DNI step of each FCN layer (forward,
  weight gradient, and input gradient above layer 1) and of one
  synthetic-gradient model (prediction, regression and its gradient): the
  balancing heuristic. Returns (layer_costs, interface_cost)."""
  d_in = math.prod(config.input_shape)
  h, k = config.hidden_size, config.num_classes
  sg_in = h + (k if config.method == 'cdni' else 0)
  sg_widths = ([sg_in] + [config.sg_hidden_size]
               * config.resolved_sg_hidden_layers + [h])
  sg = 3 * sum(a * b for a, b in zip(sg_widths, sg_widths[1:]))
  costs = [2 * d_in * h] + [3 * h * h] * (config.num_layers - 2) + [3 * h * k]
  return costs, sg


# ---------------------------------------------------------------------------
# The decoupled DNI pipeline.
# ---------------------------------------------------------------------------

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


class PipelineLayout(NamedTuple):
  """Static facts of a staged network."""
  stages: tuple[tuple[int, ...], ...]   # Hidden layers (0-based) per stage.
  input_shapes: tuple[tuple[int, ...], ...]   # Per example, per stage.
  output_shapes: tuple[tuple[int, ...], ...]  # Per example, stages 0..S-2.
  width: int                                  # D.
  batch_size: int


def stage_trees(stages, ff_state: feedforward.FeedForwardState):
  """Per stage: (layer states [, head on top]), synthetic state or ()."""
  blocks, synth = [], []
  for s, stage in enumerate(stages):
    layer_states = tuple(ff_state.layers[i] for i in stage)
    if s == len(stages) - 1:
      blocks.append((layer_states, ff_state.head))
      synth.append(())
    else:
      blocks.append((layer_states,))
      synth.append(ff_state.synthetic[s])
  return blocks, synth


def _activation_shapes(modules, config, ff_state_shape):
  """Per-example output shape of every hidden layer (abstract evaluation)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(config.input_shape), jnp.float32)
  shapes = []
  for i, layer_state in enumerate(ff_state_shape.layers):
    x = jax.eval_shape(functools.partial(feedforward.hidden_forward, modules,
                                         i, train=False), layer_state, x)
    shapes.append(tuple(x.shape[1:]))
  return shapes


def pipeline_layout(config: feedforward.FeedForwardConfig, modules,
                    batch_size: int) -> PipelineLayout:
  """The static layout of `config`'s stages (no devices involved)."""
  ff_state_shape = jax.eval_shape(
      functools.partial(feedforward.init, modules, config), jax.random.key(0))
  stages = config.blocks
  shapes = _activation_shapes(modules, config, ff_state_shape)
  # A stage reads the output of the stage below (the top stage may hold no
  # hidden layer, only the classifier).
  input_shapes = tuple([tuple(config.input_shape)]
                       + [shapes[below[-1]] for below in stages[:-1]])
  output_shapes = tuple(shapes[stage[-1]] for stage in stages[:-1])
  width = max(math.prod(s) for s in output_shapes)
  return PipelineLayout(stages, input_shapes, output_shapes, width,
                        batch_size)


def stack_stages(layout: PipelineLayout, ff_state: feedforward.FeedForwardState):
  """FeedForwardState -> (blocks, synthetic), one stage-placed tree per
  stage (`place_stage`)."""
  blocks, synth = stage_trees(layout.stages, ff_state)
  num_stages = len(layout.stages)
  return (tuple(place_stage(b, s, num_stages) for s, b in enumerate(blocks)),
          tuple(place_stage(t, s, num_stages) for s, t in enumerate(synth)))


def unstack_stages(layout: PipelineLayout, blocks, synthetic,
                   step: Array) -> feedforward.FeedForwardState:
  """Inverse of `stack_stages`."""
  num_stages = len(layout.stages)
  layer_states = {}
  synth, head = [], None
  for s, stage in enumerate(layout.stages):
    tree = stage_slice(blocks[s], s)
    layer_states.update(zip(stage, tree[0]))
    if s == num_stages - 1:
      head = tree[1]
    else:
      synth.append(stage_slice(synthetic[s], s))
  return feedforward.FeedForwardState(
      tuple(layer_states[i] for i in sorted(layer_states)), head,
      tuple(synth), step)


class Pipeline(NamedTuple):
  """What `make_pipeline` returns.

    init(rng) -> PipelineState             (the same weights as ff.init(rng))
    from_feedforward(ff_state) -> PipelineState   (empty pipeline)
    to_feedforward(state) -> FeedForwardState
    tick(state, images, labels) -> (state, metrics)  (a train_step)
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
    x, y = _unflatten_examples(x_flat, layout.input_shapes[s]), x_labels
  zeros = jnp.zeros((batch, layout.width), jnp.float32)
  if s < num_stages - 1:
    new_layers, outputs, grad_x, grad_h = feedforward.block_update(
        modules, stage, block[0], synthetic_state, x,
        feedforward.context_for(modules, y))
    new_block = (new_layers,)
    h_flat = _flatten_examples(outputs[-1], layout.width)
    loss = accuracy = jnp.zeros((), jnp.float32)
    grad_finite = jnp.all(jnp.isfinite(grad_h))
  else:
    new_layers, head, outputs, grad_x, loss, logits = (
        feedforward.top_block_update(modules, stage, block[0], block[1], x, y))
    new_block = (new_layers, head)
    h_flat = zeros
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y).astype(jnp.float32)
    grad_finite = jnp.ones((), jnp.bool_)
  grad_flat = zeros if s == 0 else _flatten_examples(grad_x, layout.width)
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
      modules, synthetic_state, _unflatten_examples(h_flat, shape),
      feedforward.context_for(modules, h_labels),
      _unflatten_examples(target_flat, shape))


def _mark_varying(tree):
  """Marks every array as varying over `stage` (a per-stage value), so that
  cond branches and scan carries have equal types under shard_map."""
  def mark(x):
    if STAGE_AXIS in jax.typeof(x).mat.varying:
      return x
    return lax.pcast(x, (STAGE_AXIS,), to='varying')
  return jax.tree.map(mark, tree)


def _varying(fn):
  """`fn` with every output marked as varying over `stage`."""
  @functools.wraps(fn)
  def wrapped(*args):
    return _mark_varying(fn(*args))
  return wrapped


def _squeeze(tree):
  return jax.tree.map(lambda a: a[0], tree)


def _expand(tree):
  return jax.tree.map(lambda a: a[None], tree)


def _select_stage(s: Array, per_stage: list):
  """Stage s's value of each leaf, from a list with one pytree per stage."""
  return jax.tree.map(lambda *xs: lax.select_n(s, *xs), *per_stage)


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
  Stage k's modules are updated under `lax.cond(stage == k, update, keep)`,
  one cond per stage: the device of stage k runs the update, the others keep
  their placeholder as it is, which XLA aliases in place (a `lax.switch`
  returning every stage's modules from every branch would copy the other
  stages' placeholders on every tick).
  """
  num_stages = len(layout.stages)
  s = lax.axis_index(STAGE_AXIS)
  local = _squeeze(state)
  valid = local.input_valid | (s == 0)
  batch = labels.shape[0]
  zeros = jnp.zeros((batch, layout.width), jnp.float32)

  # 1. Every stage updates its block at once from its synthetic gradient.
  blocks, outs = [], []
  for k in range(num_stages):
    def update(block, k=k):
      return stage_block_phase(modules, layout, k, block, local.synthetic[k],
                               images, labels, local.inputs,
                               local.input_labels)
    def keep(block):
      return block, zeros, zeros, local.input_labels, skip_metrics()
    block, *out = lax.cond((s == k) & valid, _varying(update), _varying(keep),
                           local.blocks[k])
    blocks.append(block)
    outs.append(out)
  h_flat, grad_flat, y, metrics = _select_stage(s, outs)

  # 2. Activations (with their labels) go up, input gradients (with the top
  # stage's loss and accuracy) go down.
  width = layout.width
  from_below, from_above = _exchange(
      num_stages, s, _message(h_flat, y, valid),
      jnp.concatenate([grad_flat, _column(metrics['loss'], batch),
                       _column(metrics['accuracy'], batch)], axis=1))
  inputs, input_labels, input_valid = _read_message(from_below, width)
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
  synthetic, sg_losses = [], []
  for k in range(num_stages - 1):
    def update(sg_state, k=k):
      return stage_synthetic_phase(modules, layout, k, sg_state,
                                   local.outputs, local.output_labels, target)
    def keep(sg_state):
      return sg_state, jnp.zeros((), jnp.float32)
    sg_state, sg_loss = lax.cond((s == k) & has_target, _varying(update),
                                 _varying(keep), local.synthetic[k])
    synthetic.append(sg_state)
    sg_losses.append(sg_loss)
  synthetic.append(local.synthetic[-1])   # The top stage has no model: ().
  sg_loss = _select_stage(s, sg_losses + [jnp.zeros((), jnp.float32)])

  new_local = PipelineState(
      blocks=tuple(blocks), synthetic=tuple(synthetic), inputs=inputs,
      input_labels=input_labels, input_valid=input_valid, outputs=h_flat,
      output_labels=y, output_valid=valid, step=local.step + 1)
  metrics = dict(metrics, sg_loss=sg_loss, updated=valid,
                 sg_updated=has_target, top=top)
  return _expand(new_local), _expand(metrics)


def _top_metrics(num_stages: int, per_stage: dict[str, Array]) -> Array:
  """[K, 2]: the top stage's loss and accuracy per tick. With two stages
  every stage holds them already (`pipeline_tick_local`: same bits, varying
  only in type); with more, they are summed over the stages (one all-reduce
  per call; the other stages contribute zeros)."""
  if num_stages == 2:
    return per_stage['top'][:, 0]
  on_top = lax.axis_index(STAGE_AXIS) == num_stages - 1
  return lax.psum(jnp.where(on_top, jnp.concatenate(
      [per_stage['loss'], per_stage['accuracy']], axis=1), 0.0), STAGE_AXIS)


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


def _fit_metrics(per_stage: dict[str, Array], top: Array) -> dict[str, Array]:
  """Per-stage metrics [K, S] -> the `training.fit` contract of the fused step
  with a leading K axis (loss and accuracy from the top stage; sg_loss per
  interface)."""
  return {
      'loss': top[:, 0],
      'accuracy': top[:, 1],
      'sg_loss': per_stage['sg_loss'][:, :-1],
      'block_updated': per_stage['updated'],
      'sg_updated': per_stage['sg_updated'][:, :-1],
      'activation_finite': per_stage['activation_finite'],
      'layer_finite': per_stage['layer_finite'],
      'synthetic_gradient_finite': per_stage['synthetic_gradient_finite'][
          :, :-1],
  }


def global_array(mesh, spec, value) -> Array:
  """A host value as a global array with `NamedSharding(mesh, spec)`; works
  with several processes, each holding the same value."""
  value = np.asarray(value)
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


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
  layout = pipeline_layout(config, modules, batch_size)
  if donate is None:
    donate = jax.default_backend() != 'cpu'
  stage_spec = jax.P(STAGE_AXIS)

  stack = jax.jit(functools.partial(stack_stages, layout))

  def from_feedforward(ff_state) -> PipelineState:
    """An empty pipeline holding `ff_state`'s modules (a host round trip, so
    it works across processes)."""
    blocks, synth = stack(ff_state)
    S, B, D = num_stages, batch_size, layout.width
    state = PipelineState(
        blocks=blocks, synthetic=synth,
        inputs=jnp.zeros((S, B, D), jnp.float32),
        input_labels=jnp.zeros((S, B), jnp.int32),
        input_valid=jnp.zeros((S,), jnp.bool_),
        outputs=jnp.zeros((S, B, D), jnp.float32),
        output_labels=jnp.zeros((S, B), jnp.int32),
        output_valid=jnp.zeros((S,), jnp.bool_),
        step=jnp.full((S,), ff_state.step, jnp.int32))
    return jax.tree.map(lambda v: global_array(mesh, stage_spec, v),
                        jax.device_get(state))

  def init(rng):
    return from_feedforward(jax.jit(init_ff)(rng))

  def to_feedforward(state: PipelineState) -> feedforward.FeedForwardState:
    return unstack_stages(layout, state.blocks, state.synthetic,
                          state.step[0])

  tick_local = functools.partial(pipeline_tick_local, modules, layout)

  out_specs = (stage_spec, jax.P(None, STAGE_AXIS), stage_spec)

  def ticks(state, images, labels):
    new_state, per_stage, top = jax.shard_map(
        functools.partial(pipeline_ticks_local, modules, layout), mesh=mesh,
        in_specs=(stage_spec, jax.P(), jax.P()), out_specs=out_specs)(
            state, images, labels)
    return new_state, _fit_metrics(per_stage, _same_on_every_stage(mesh, top))

  def one_tick_local(state, images, labels):
    state, per_stage = tick_local(state, images, labels)
    per_stage = _expand(per_stage)   # [K=1, 1]
    return state, per_stage, _top_metrics(num_stages, per_stage)[None]

  def tick(state, images, labels):
    new_state, per_stage, top = jax.shard_map(
        one_tick_local, mesh=mesh, in_specs=(stage_spec, jax.P(), jax.P()),
        out_specs=out_specs)(state, images, labels)
    return new_state, jax.tree.map(
        lambda m: m[0], _fit_metrics(per_stage, _same_on_every_stage(mesh,
                                                                      top)))

  def eval_batch(state, images, labels):
    return feedforward.eval_batch(modules, to_feedforward(state), images,
                                  labels)

  wrap = jax.jit if jit else (lambda f, **_: f)
  donation = {'donate_argnums': (0,) if donate else ()}
  return Pipeline(
      config=config, modules=modules, layout=layout, mesh=mesh, init=init,
      from_feedforward=from_feedforward,
      to_feedforward=wrap(to_feedforward), tick=wrap(tick, **donation),
      ticks=wrap(ticks, **donation), eval_batch=wrap(eval_batch),
      tick_local=tick_local)


# ---------------------------------------------------------------------------
# The backprop pipeline (GPipe) on the same mesh.
# ---------------------------------------------------------------------------

class BackpropPipelineState(NamedTuple):
  """Every leaf [S, ...], sharded over `stage`."""
  blocks: tuple   # Per stage s: (layer states,) or, on the top stage,
                  # (layer states, classifier state), placed as in
                  # `PipelineState.blocks`.
  step: Array     # [S] int32.


def backprop_stages(num_layers: int,
                    boundaries: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  """Hidden layers (0-based) per stage; `boundaries` are the 1-based layers
  after which a stage ends (as `dni_layers`)."""
  cuts = (0,) + tuple(boundaries) + (num_layers - 1,)
  return tuple(tuple(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:]))


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


def _stage_models(modules, stages, s):
  models = tuple(modules.hidden[i] for i in stages[s])
  if s == len(stages) - 1:
    models += (modules.head,)
  return models


def _stage_states(tree, s, num_stages):
  """Stage tree -> list of module states (layers [+ head])."""
  return list(tree[0]) + ([tree[1]] if s == num_stages - 1 else [])


def _stage_tree(states, s, num_stages):
  if s == num_stages - 1:
    return (tuple(states[:-1]), states[-1])
  return (tuple(states),)


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
  stages = backprop_stages(config.num_layers, boundaries)
  num_stages = len(stages)
  if mesh.shape.get(STAGE_AXIS) != num_stages:
    raise ValueError(f'{num_stages} stages but the mesh is {dict(mesh.shape)}')
  M = num_microbatches
  if M < 1 or batch_size % M:
    raise ValueError(f'num_microbatches={M} must divide batch_size='
                     f'{batch_size}')
  mb = batch_size // M
  modules = feedforward.build_modules(config)
  init_ff = functools.partial(feedforward.init, modules, config)
  shapes = _activation_shapes(modules, config,
                              jax.eval_shape(init_ff, jax.random.key(0)))
  input_shapes = [tuple(config.input_shape)] + [shapes[below[-1]]
                                                for below in stages[:-1]]
  width = max(math.prod(shapes[st[-1]]) for st in stages[:-1])
  if donate is None:
    donate = jax.default_backend() != 'cpu'
  stage_spec = jax.P(STAGE_AXIS)
  tx = modules.tx

  def stage_input(s, images_mb, x_flat):
    if s == 0:
      return images_mb
    return _unflatten_examples(x_flat, input_shapes[s])

  def forward(s, block, images_mb, labels_mb, x_flat):
    """Forward of stage s on one micro-batch: (block with the new BatchNorm
    statistics, h_flat, loss)."""
    states = _stage_states(block, s, num_stages)
    outputs, _, stats = feedforward.chain_vjp(
        _stage_models(modules, stages, s), states,
        stage_input(s, images_mb, x_flat))
    states = [st._replace(batch_stats=b) for st, b in zip(states, stats)]
    block = _stage_tree(states, s, num_stages)
    if s == num_stages - 1:
      loss, _ = interface.softmax_cross_entropy_grad(outputs[-1], labels_mb)
      return block, jnp.zeros((mb, width), jnp.float32), loss
    return (block, _flatten_examples(outputs[-1], width),
            jnp.zeros((), jnp.float32))

  def backward(s, block, grads, images_mb, labels_mb, x_flat, g_flat):
    """Re-materialised forward and backward of stage s on one micro-batch,
    from the gradient its successor sent (the top stage: the loss gradient).
    Returns (grads + this micro-batch's, grad_x_flat)."""
    states = _stage_states(block, s, num_stages)
    outputs, vjps, _ = feedforward.chain_vjp(
        _stage_models(modules, stages, s), states,
        stage_input(s, images_mb, x_flat))
    if s == num_stages - 1:
      grad_h = interface.softmax_cross_entropy_grad(outputs[-1], labels_mb)[1]
    else:
      grad_h = _unflatten_examples(g_flat, shapes[stages[s][-1]])
    param_grads, input_grads = feedforward.chain_pull_back(vjps, grad_h)
    grads = jax.tree.map(jnp.add, grads, list(param_grads))
    grad_x = (jnp.zeros((mb, width), jnp.float32) if s == 0
              else _flatten_examples(input_grads[0], width))
    return grads, grad_x

  def apply(s, block, grads):
    """One Adam step per module of stage s with the mean micro-batch
    gradient."""
    states = _stage_states(block, s, num_stages)
    states = [feedforward.apply_gradients(
        tx, st, jax.tree.map(lambda g: g / M, g), st.batch_stats)
        for st, g in zip(states, grads)]
    return _stage_tree(states, s, num_stages)

  def train_step_local(state: BackpropPipelineState, images, labels):
    # As in the decoupled pipeline, stage k's modules change only under
    # lax.cond(stage == k, ...), so the other stages' placeholders stay in
    # place.
    s = lax.axis_index(STAGE_AXIS)
    local = _squeeze(state)
    images_mb = images.reshape((M, mb) + images.shape[1:])
    labels_mb = labels.reshape(M, mb)
    # Cyclic shifts (see `_exchange`); what wraps around is ignored: stage 0
    # reads the data, the top stage the loss gradient.
    up = [(i, (i + 1) % num_stages) for i in range(num_stages)]
    down = [(i, (i - 1) % num_stages) for i in range(num_stages)]
    ticks = M + num_stages - 1
    zeros = jnp.zeros((mb, width), jnp.float32)
    zero = jnp.zeros((), jnp.float32)

    # Fill: on tick f stage s runs micro-batch f - s forward.
    def forward_tick(carry, f):
      blocks, x_flat, stash, loss_sum = carry
      m = f - s
      valid = (m >= 0) & (m < M)
      mc = jnp.clip(m, 0, M - 1)
      new_blocks, outs = [], []
      for k in range(num_stages):
        block, *out = lax.cond(
            (s == k) & valid,
            _varying(functools.partial(forward, k)),
            _varying(lambda block, *_: (block, zeros, zero)),
            blocks[k], images_mb[mc], labels_mb[mc], x_flat)
        new_blocks.append(block)
        outs.append(out)
      h_flat, loss = _select_stage(s, outs)
      stash = stash.at[mc].set(jnp.where(valid, x_flat, stash[mc]))
      loss_sum = loss_sum + loss
      x_flat = lax.ppermute(h_flat, STAGE_AXIS, up)
      return (tuple(new_blocks), x_flat, stash, loss_sum), None

    stash = jnp.zeros((M, mb, width), jnp.float32)
    (blocks, _, stash, loss_sum), _ = lax.scan(
        forward_tick,
        _mark_varying((local.blocks, zeros, stash, zero)),
        jnp.arange(ticks))

    # Drain: on tick b stage s runs micro-batch b - (S - 1 - s) backward.
    def backward_tick(carry, b):
      grads, g_flat = carry
      m = b - (num_stages - 1 - s)
      valid = (m >= 0) & (m < M)
      mc = jnp.clip(m, 0, M - 1)
      new_grads, grads_x = [], []
      for k in range(num_stages):
        acc, grad_x = lax.cond(
            (s == k) & valid,
            _varying(lambda acc, *args, k=k: backward(k, blocks[k], acc,
                                                      *args)),
            _varying(lambda acc, *_: (acc, zeros)),
            grads[k], images_mb[mc], labels_mb[mc], stash[mc], g_flat)
        new_grads.append(acc)
        grads_x.append(grad_x)
      g_flat = lax.ppermute(_select_stage(s, grads_x), STAGE_AXIS, down)
      return (tuple(new_grads), g_flat), None

    grads0 = tuple(jax.tree.map(jnp.zeros_like, [
        m.params for m in _stage_states(blocks[k], k, num_stages)])
                   for k in range(num_stages))
    (grads, _), _ = lax.scan(backward_tick, _mark_varying((grads0, zeros)),
                             jnp.arange(ticks))
    blocks = tuple(
        lax.cond(s == k, _varying(functools.partial(apply, k)),
                 _varying(lambda block, _: block), blocks[k], grads[k])
        for k in range(num_stages))
    metrics = {'loss': loss_sum / M}
    return (_expand(BackpropPipelineState(blocks, local.step + 1)),
            _expand(metrics))

  def top_loss(loss):
    """[K] per stage, only the top stage's non-zero -> the top stage's, on
    every stage ([1, K]): with two stages one cyclic permute, else an
    all-reduce."""
    if num_stages == 2:
      s = lax.axis_index(STAGE_AXIS)
      received = lax.ppermute(loss, STAGE_AXIS, [(0, 1), (1, 0)])
      return jnp.where(s == 1, loss, received)[None]
    return lax.psum(loss, STAGE_AXIS)[None]

  def train_steps_local(state, images, labels):
    state, per_stage = lax.scan(
        lambda st, batch: train_step_local(st, *batch), state,
        (images, labels))
    return state, top_loss(per_stage['loss'][:, 0])

  def one_step_local(state, images, labels):
    state, per_stage = train_step_local(state, images, labels)
    return state, top_loss(per_stage['loss'])

  def train_steps(state, images, labels):
    new_state, loss = jax.shard_map(
        train_steps_local, mesh=mesh, in_specs=(stage_spec, jax.P(), jax.P()),
        out_specs=(stage_spec, stage_spec))(state, images, labels)
    return new_state, {'loss': _same_on_every_stage(mesh, loss)}

  def train_step(state, images, labels):
    new_state, loss = jax.shard_map(
        one_step_local, mesh=mesh, in_specs=(stage_spec, jax.P(), jax.P()),
        out_specs=(stage_spec, stage_spec))(state, images, labels)
    return new_state, {'loss': _same_on_every_stage(mesh, loss)[0]}

  def stack(ff_state):
    blocks = []
    for s, st in enumerate(stages):
      tree = (tuple(ff_state.layers[i] for i in st),)
      if s == num_stages - 1:
        tree += (ff_state.head,)
      blocks.append(place_stage(tree, s, num_stages))
    return BackpropPipelineState(
        tuple(blocks), jnp.full((num_stages,), ff_state.step, jnp.int32))

  def from_feedforward(ff_state):
    """An empty pipeline holding `ff_state`'s modules (host round trip, so it
    works across processes)."""
    return jax.tree.map(lambda v: global_array(mesh, stage_spec, v),
                        jax.device_get(jax.jit(stack)(ff_state)))

  def init(rng):
    return from_feedforward(jax.jit(init_ff)(rng))

  def to_feedforward(state):
    layer_states, head = {}, None
    for s, st in enumerate(stages):
      tree = stage_slice(state.blocks[s], s)
      layer_states.update(zip(st, tree[0]))
      if s == num_stages - 1:
        head = tree[1]
    return feedforward.FeedForwardState(
        tuple(layer_states[i] for i in sorted(layer_states)), head, (),
        state.step[0])

  def eval_batch(state, images, labels):
    return feedforward.eval_batch(modules, to_feedforward(state), images,
                                  labels)

  wrap = jax.jit if jit else (lambda f, **_: f)
  donation = {'donate_argnums': (0,) if donate else ()}
  return BackpropPipeline(
      config=config, modules=modules, stages=stages, num_microbatches=M,
      mesh=mesh, init=init, from_feedforward=from_feedforward,
      to_feedforward=wrap(to_feedforward),
      train_step=wrap(train_step, **donation),
      train_steps=wrap(train_steps, **donation), eval_batch=wrap(eval_batch),
      train_step_local=train_step_local)

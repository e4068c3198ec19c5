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
(tests/test_pipeline.py).

SPMD layout: under `shard_map` every device runs one program, but stages
differ (the first reads the images, the top one holds the classifier). Each
stage's module states are therefore *packed*: its pytree is flattened into one
1-D buffer per dtype, zero-padded to the longest stage, and the stages are
stacked along a leading axis sharded over `stage`. The tick unpacks its own
slice inside `lax.switch(axis_index('stage'), per-stage branches)`, calls the
per-module functions of `dni_jax.feedforward`, and packs the result: exact
(reshapes and slices), and any network the feedforward protocol supports can
be staged this way. Activations crossing stages are flattened per example and
padded to the widest interface.

The same code runs over fake CPU devices, one process per pinned CPU core
(`scripts/benchmark.py --suite=pipeline --processes=N`), or real accelerators
on one or many hosts: only the mesh's devices differ.
"""

import functools
import itertools
import math
from typing import Any, Callable, NamedTuple

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
# Packing: a pytree <-> one zero-padded 1-D buffer per dtype.
# ---------------------------------------------------------------------------

class PackSpec(NamedTuple):
  """How a pytree is laid out in per-dtype flat buffers (static)."""
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]

  def sizes(self) -> dict[str, int]:
    total = {}
    for shape, dtype in zip(self.shapes, self.dtypes):
      total[dtype] = total.get(dtype, 0) + math.prod(shape)
    return total


def pack_spec(tree) -> PackSpec:
  """The layout of `tree` (arrays or ShapeDtypeStructs)."""
  leaves, treedef = jax.tree.flatten(tree)
  return PackSpec(treedef, tuple(tuple(l.shape) for l in leaves),
                  tuple(jnp.dtype(l.dtype).name for l in leaves))


def buffer_widths(specs) -> dict[str, int]:
  """The common width per dtype (the longest of `specs`, at least 1)."""
  names = sorted({d for spec in specs for d in spec.dtypes})
  return {d: max(1, max(spec.sizes().get(d, 0) for spec in specs))
          for d in names}


def pack(spec: PackSpec, tree, widths: dict[str, int]) -> dict[str, Array]:
  """Flattens `tree` into {dtype: [width]} buffers, zero-padded."""
  leaves = jax.tree.leaves(tree)
  parts = {d: [] for d in widths}
  for leaf, dtype in zip(leaves, spec.dtypes):
    parts[dtype].append(jnp.ravel(leaf))
  out = {}
  for dtype, width in widths.items():
    used = sum(p.shape[0] for p in parts[dtype])
    parts[dtype].append(jnp.zeros((width - used,), dtype))
    out[dtype] = jnp.concatenate(parts[dtype])
  return out


def unpack(spec: PackSpec, buffers: dict[str, Array]):
  """Inverse of `pack`."""
  offsets = {d: 0 for d in buffers}
  leaves = []
  for shape, dtype in zip(spec.shapes, spec.dtypes):
    size = math.prod(shape)
    start = offsets[dtype]
    leaves.append(buffers[dtype][start:start + size].reshape(shape))
    offsets[dtype] = start + size
  return jax.tree.unflatten(spec.treedef, leaves)


def _flatten_examples(x: Array, width: int) -> Array:
  """[B, ...] -> [B, width], zero-padded (activations crossing stages)."""
  flat = x.reshape(x.shape[0], -1)
  return jnp.pad(flat, ((0, 0), (0, width - flat.shape[1])))


def _unflatten_examples(flat: Array, shape: tuple[int, ...]) -> Array:
  return flat[:, :math.prod(shape)].reshape((flat.shape[0],) + shape)


def _keep(flag: Array, new, old):
  """`new` where `flag`, else `old` (a stage with no real input this tick)."""
  return jax.tree.map(lambda n, o: jnp.where(flag, n, o), new, old)


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
  sg_widths = [sg_in] + [config.sg_hidden_size] * config.sg_hidden_layers + [h]
  sg = 3 * sum(a * b for a, b in zip(sg_widths, sg_widths[1:]))
  costs = [2 * d_in * h] + [3 * h * h] * (config.num_layers - 2) + [3 * h * k]
  return costs, sg


# ---------------------------------------------------------------------------
# The decoupled DNI pipeline.
# ---------------------------------------------------------------------------

class PipelineState(NamedTuple):
  """State of an S-stage decoupled pipeline. Every field has a leading stage
  axis [S, ...], sharded over the mesh's `stage` axis (B: batch size, D: the
  widest interface, flattened)."""
  blocks: dict[str, Array]     # [S, W]: the stage's hidden layers (and the
                               # classifier on the top stage), packed.
  synthetic: dict[str, Array]  # [S, W']: the synthetic-gradient model on the
                               # stage's output interface (none on the top).
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
  block_specs: tuple[PackSpec, ...]
  synthetic_specs: tuple[PackSpec, ...]
  block_widths: dict[str, int]
  synthetic_widths: dict[str, int]
  input_shapes: tuple[tuple[int, ...], ...]   # Per example, per stage.
  output_shapes: tuple[tuple[int, ...], ...]  # Per example, stages 0..S-2.
  width: int                                  # D.
  batch_size: int


def _stage_trees(stages, ff_state: feedforward.FeedForwardState):
  """Per stage: (layer states [+ head on top]), synthetic state or ()."""
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


def pipeline_layout(config: feedforward.FeedForwardConfig, modules,
                    batch_size: int) -> PipelineLayout:
  """The static layout of `config`'s stages (no devices involved)."""
  return _layout(config, modules, batch_size, jax.eval_shape(
      functools.partial(feedforward.init, modules, config),
      jax.random.key(0)))


def _layout(config: feedforward.FeedForwardConfig, modules, batch_size: int,
            ff_state_shape) -> PipelineLayout:
  stages = config.blocks
  blocks, synth = _stage_trees(stages, ff_state_shape)
  block_specs = tuple(pack_spec(b) for b in blocks)
  synthetic_specs = tuple(pack_spec(s) for s in synth)
  # Per-example activation shapes, by abstract evaluation of the layers.
  x = jax.ShapeDtypeStruct((1,) + tuple(config.input_shape), jnp.float32)
  shapes = []
  for i, layer_state in enumerate(ff_state_shape.layers):
    x = jax.eval_shape(functools.partial(feedforward.hidden_forward, modules,
                                         i, train=False), layer_state, x)
    shapes.append(tuple(x.shape[1:]))
  # A stage reads the output of the stage below (the top stage may hold no
  # hidden layer, only the classifier).
  input_shapes = tuple([tuple(config.input_shape)]
                       + [shapes[below[-1]] for below in stages[:-1]])
  output_shapes = tuple(shapes[stage[-1]] for stage in stages[:-1])
  width = max(math.prod(s) for s in output_shapes)
  return PipelineLayout(stages, block_specs, synthetic_specs,
                        buffer_widths(block_specs),
                        buffer_widths(synthetic_specs), input_shapes,
                        output_shapes, width, batch_size)


def stack_stages(layout: PipelineLayout, ff_state: feedforward.FeedForwardState):
  """FeedForwardState -> (blocks, synthetic) packed buffers, [S, W] each."""
  blocks, synth = _stage_trees(layout.stages, ff_state)
  stack = lambda specs, trees, widths: {
      d: jnp.stack([pack(spec, tree, widths)[d]
                    for spec, tree in zip(specs, trees)])
      for d in widths}
  return (stack(layout.block_specs, blocks, layout.block_widths),
          stack(layout.synthetic_specs, synth, layout.synthetic_widths))


def unstack_stages(layout: PipelineLayout, blocks, synthetic,
                   step: Array) -> feedforward.FeedForwardState:
  """Inverse of `stack_stages`."""
  num_stages = len(layout.stages)
  layer_states = {}
  synth, head = [], None
  for s, stage in enumerate(layout.stages):
    tree = unpack(layout.block_specs[s], {d: b[s] for d, b in blocks.items()})
    layer_states.update(zip(stage, tree[0]))
    if s == num_stages - 1:
      head = tree[1]
    else:
      synth.append(unpack(layout.synthetic_specs[s],
                          {d: b[s] for d, b in synthetic.items()}))
  return feedforward.FeedForwardState(
      tuple(layer_states[i] for i in sorted(layer_states)), head,
      tuple(synth), step)


class Pipeline(NamedTuple):
  """What `make_pipeline` returns.

    init(rng) -> PipelineState             (the same weights as ff.init(rng))
    from_feedforward(ff_state) -> PipelineState   (empty pipeline)
    to_feedforward(state) -> FeedForwardState
    tick(state, images, labels) -> (state, metrics)  (a train_step)
    eval_batch(state, images, labels) -> sums   (all layers connected)
  `tick_local` is the per-device program (under `shard_map`).
  """
  config: feedforward.FeedForwardConfig
  modules: feedforward.Modules
  layout: PipelineLayout
  mesh: jax.sharding.Mesh
  init: Callable
  from_feedforward: Callable
  to_feedforward: Callable
  tick: Callable
  eval_batch: Callable
  tick_local: Callable


def _check_dni_config(config: feedforward.FeedForwardConfig):
  if config.method not in feedforward.DECOUPLED_METHODS:
    raise ValueError(f'the decoupled pipeline needs method dni or cdni, not '
                     f'{config.method}')
  if config.synthetic_inputs or config.p_update < 1:
    raise ValueError('the decoupled pipeline does not implement '
                     'synthetic_inputs or p_update < 1')
  if len(config.blocks) < 2:
    raise ValueError('the decoupled pipeline needs at least one interface '
                     '(two stages)')


def stage_block_phase(modules, layout: PipelineLayout, s: int, block_buf,
                      synthetic_buf, images, labels, x_flat, x_labels):
  """Phase 1 of a tick on stage s (static): the stage's block update.

  Stage 0 reads the data, the others the activation received last tick. Below
  the top, the gradient source is the stage's own synthetic-gradient model
  (`feedforward.block_update`); the top stage learns from the loss
  (`feedforward.top_block_update`). Returns (block_buf, h_flat, grad_x_flat,
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
  tree = unpack(layout.block_specs[s], block_buf)
  zeros = jnp.zeros((batch, layout.width), jnp.float32)
  if s < num_stages - 1:
    sg_state = unpack(layout.synthetic_specs[s], synthetic_buf)
    new_layers, outputs, grad_x, grad_h = feedforward.block_update(
        modules, stage, tree[0], sg_state, x,
        feedforward.context_for(modules, y))
    new_tree = (new_layers,)
    h_flat = _flatten_examples(outputs[-1], layout.width)
    loss = accuracy = jnp.zeros((), jnp.float32)
    grad_finite = jnp.all(jnp.isfinite(grad_h))
  else:
    new_layers, head, outputs, grad_x, loss, logits = (
        feedforward.top_block_update(modules, stage, tree[0], tree[1], x, y))
    new_tree = (new_layers, head)
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
                  new_tree, is_leaf=lambda m: isinstance(m, ModuleState))])])),
      'synthetic_gradient_finite': grad_finite,
  }
  return pack(layout.block_specs[s], new_tree, layout.block_widths), \
      h_flat, grad_flat, y, metrics


def stage_synthetic_phase(modules, layout: PipelineLayout, s: int,
                          synthetic_buf, h_flat, h_labels, target_flat):
  """Phase 3 of a tick on stage s: regress the stage's synthetic-gradient
  model onto the target its successor just pulled back, at the activation the
  stage sent last tick (`feedforward.synthetic_update`). The top stage has no
  model. Returns (synthetic_buf, sg_loss)."""
  if s == len(layout.stages) - 1:
    return synthetic_buf, jnp.zeros((), jnp.float32)
  shape = layout.output_shapes[s]
  sg_state = unpack(layout.synthetic_specs[s], synthetic_buf)
  sg_state, sg_loss = feedforward.synthetic_update(
      modules, sg_state, _unflatten_examples(h_flat, shape),
      feedforward.context_for(modules, h_labels),
      _unflatten_examples(target_flat, shape))
  return pack(layout.synthetic_specs[s], sg_state,
              layout.synthetic_widths), sg_loss


def _mark_varying(tree):
  """Marks every array as varying over `stage` (a per-stage value), so that
  switch branches and scan carries have equal types under shard_map."""
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


def _branches(fn, num_stages):
  """[fn(0, ...), ..., fn(S-1, ...)] for `lax.switch` on the stage index."""
  return [_varying(functools.partial(fn, s)) for s in range(num_stages)]


def _squeeze(tree):
  return jax.tree.map(lambda a: a[0], tree)


def _expand(tree):
  return jax.tree.map(lambda a: a[None], tree)


def pipeline_tick_local(modules, layout: PipelineLayout, state: PipelineState,
                        images: Array, labels: Array):
  """One tick on one stage (the per-device program; call under shard_map).

  `state` holds this stage's slice (leading axis of size 1); images and labels
  are this tick's batch (read by stage 0). Returns (state, per-stage metrics).
  """
  num_stages = len(layout.stages)
  s = lax.axis_index(STAGE_AXIS)
  local = _squeeze(state)
  valid = local.input_valid | (s == 0)

  # 1. Every stage updates its block at once from its synthetic gradient.
  block_buf, h_flat, grad_flat, y, metrics = lax.switch(
      s, _branches(functools.partial(stage_block_phase, modules, layout),
                   num_stages), local.blocks, local.synthetic, images, labels,
      local.inputs, local.input_labels)
  block_buf = _keep(valid, block_buf, local.blocks)

  # 2. Activations (with their labels) go up, input gradients go down.
  up = [(i, i + 1) for i in range(num_stages - 1)]
  down = [(i + 1, i) for i in range(num_stages - 1)]
  inputs, input_labels, input_valid = lax.ppermute(
      (h_flat, y, valid), STAGE_AXIS, up)
  target = lax.ppermute(grad_flat, STAGE_AXIS, down)

  # 3. The synthetic-gradient model regresses onto the target just received,
  # at the activation it was computed from (sent by this stage last tick).
  synthetic_buf, sg_loss = lax.switch(
      s, _branches(functools.partial(stage_synthetic_phase, modules, layout),
                   num_stages), local.synthetic, local.outputs, local.output_labels,
      target)
  has_target = local.output_valid & (s < num_stages - 1)
  synthetic_buf = _keep(has_target, synthetic_buf, local.synthetic)

  new_local = PipelineState(
      blocks=block_buf, synthetic=synthetic_buf, inputs=inputs,
      input_labels=input_labels, input_valid=input_valid, outputs=h_flat,
      output_labels=y, output_valid=valid, step=local.step + 1)
  metrics = dict(metrics, sg_loss=jnp.where(has_target, sg_loss, 0.0),
                 loss=jnp.where(valid, metrics['loss'], 0.0),
                 accuracy=jnp.where(valid, metrics['accuracy'], 0.0),
                 updated=valid, sg_updated=has_target)
  return _expand(new_local), _expand(metrics)


def _fit_metrics(per_stage: dict[str, Array]) -> dict[str, Array]:
  """Per-stage metrics -> the `training.fit` contract of the fused step
  (loss and accuracy from the top stage; sg_loss per interface)."""
  return {
      'loss': per_stage['loss'][-1],
      'accuracy': per_stage['accuracy'][-1],
      'sg_loss': per_stage['sg_loss'][:-1],
      'block_updated': per_stage['updated'],
      'sg_updated': per_stage['sg_updated'][:-1],
      'activation_finite': per_stage['activation_finite'],
      'layer_finite': per_stage['layer_finite'],
      'synthetic_gradient_finite': per_stage['synthetic_gradient_finite'][:-1],
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
  per block of `config` (its interfaces are the stage boundaries)."""
  _check_dni_config(config)
  num_stages = len(config.blocks)
  if mesh.shape.get(STAGE_AXIS) != num_stages:
    raise ValueError(f'config has {num_stages} blocks (stages) but the mesh '
                     f'axis {STAGE_AXIS!r} is {dict(mesh.shape)}')
  modules = feedforward.build_modules(config)
  init_ff = functools.partial(feedforward.init, modules, config)
  layout = _layout(config, modules, batch_size,
                   jax.eval_shape(init_ff, jax.random.key(0)))
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

  def tick(state, images, labels):
    new_state, per_stage = jax.shard_map(
        tick_local, mesh=mesh, in_specs=(stage_spec, jax.P(), jax.P()),
        out_specs=(stage_spec, stage_spec))(state, images, labels)
    return new_state, _fit_metrics(per_stage)

  def eval_batch(state, images, labels):
    return feedforward.eval_batch(modules, to_feedforward(state), images,
                                  labels)

  wrap = jax.jit if jit else (lambda f, **_: f)
  return Pipeline(
      config=config, modules=modules, layout=layout, mesh=mesh, init=init,
      from_feedforward=from_feedforward,
      to_feedforward=wrap(to_feedforward),
      tick=wrap(tick, donate_argnums=(0,) if donate else ()),
      eval_batch=wrap(eval_batch), tick_local=tick_local)


# ---------------------------------------------------------------------------
# The backprop pipeline (GPipe) on the same mesh.
# ---------------------------------------------------------------------------

class BackpropPipelineState(NamedTuple):
  """[S, ...], sharded over `stage`: each stage's layers (and the classifier
  on the top stage), packed."""
  blocks: dict[str, Array]
  step: Array   # [S] int32.


def backprop_stages(num_layers: int,
                    boundaries: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  """Hidden layers (0-based) per stage; `boundaries` are the 1-based layers
  after which a stage ends (as `dni_layers`)."""
  cuts = (0,) + tuple(boundaries) + (num_layers - 1,)
  return tuple(tuple(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:]))


class BackpropPipeline(NamedTuple):
  """What `make_backprop_pipeline` returns (the fields as in `Pipeline`);
  `train_step(state, images, labels) -> (state, metrics)` is one GPipe step."""
  config: feedforward.FeedForwardConfig
  modules: feedforward.Modules
  stages: tuple[tuple[int, ...], ...]
  num_microbatches: int
  mesh: jax.sharding.Mesh
  init: Callable
  from_feedforward: Callable
  to_feedforward: Callable
  train_step: Callable
  eval_batch: Callable
  train_step_local: Callable


def _stage_models(modules, stages, s):
  models = tuple(modules.hidden[i] for i in stages[s])
  if s == len(stages) - 1:
    models += (modules.head,)
  return models


def _stage_states(tree, s, num_stages):
  """Packed stage tree -> list of module states (layers [+ head])."""
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
  ff_shape = jax.eval_shape(init_ff, jax.random.key(0))
  # The DNI layout code gives the shapes; no synthetic models here.
  trees = [(tuple(ff_shape.layers[i] for i in st),) for st in stages]
  trees[-1] = trees[-1] + (ff_shape.head,)
  specs = tuple(pack_spec(t) for t in trees)
  widths = buffer_widths(specs)
  param_specs = tuple(pack_spec([m.params for m in _stage_states(
      t, s, num_stages)]) for s, t in enumerate(trees))
  param_widths = buffer_widths(param_specs)
  x = jax.ShapeDtypeStruct((1,) + tuple(config.input_shape), jnp.float32)
  shapes = []
  for i, layer_state in enumerate(ff_shape.layers):
    x = jax.eval_shape(functools.partial(feedforward.hidden_forward, modules,
                                         i, train=False), layer_state, x)
    shapes.append(tuple(x.shape[1:]))
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

  def forward_branch(s, buf, images_mb, labels_mb, x_flat):
    """Forward of stage s on one micro-batch: (buf with the new BatchNorm
    statistics, h_flat, loss)."""
    tree = unpack(specs[s], buf)
    states = _stage_states(tree, s, num_stages)
    outputs, _, stats = feedforward.chain_vjp(
        _stage_models(modules, stages, s), states,
        stage_input(s, images_mb, x_flat))
    states = [st._replace(batch_stats=b) for st, b in zip(states, stats)]
    new_buf = pack(specs[s], _stage_tree(states, s, num_stages), widths)
    if s == num_stages - 1:
      loss, _ = interface.softmax_cross_entropy_grad(outputs[-1], labels_mb)
      return new_buf, jnp.zeros((mb, width), jnp.float32), loss
    return (new_buf, _flatten_examples(outputs[-1], width),
            jnp.zeros((), jnp.float32))

  def backward_branch(s, buf, grads_buf, images_mb, labels_mb, x_flat,
                      g_flat):
    """Re-materialised forward and backward of stage s on one micro-batch,
    from the gradient its successor sent (the top stage: the loss gradient).
    Returns (accumulated param grads, grad_x_flat)."""
    tree = unpack(specs[s], buf)
    states = _stage_states(tree, s, num_stages)
    outputs, vjps, _ = feedforward.chain_vjp(
        _stage_models(modules, stages, s), states,
        stage_input(s, images_mb, x_flat))
    if s == num_stages - 1:
      grad_h = interface.softmax_cross_entropy_grad(outputs[-1], labels_mb)[1]
    else:
      grad_h = _unflatten_examples(g_flat, shapes[stages[s][-1]])
    param_grads, input_grads = feedforward.chain_pull_back(vjps, grad_h)
    acc = unpack(param_specs[s], grads_buf)
    acc = jax.tree.map(jnp.add, acc, list(param_grads))
    grad_x = (jnp.zeros((mb, width), jnp.float32) if s == 0
              else _flatten_examples(input_grads[0], width))
    return pack(param_specs[s], acc, param_widths), grad_x

  def apply_branch(s, buf, grads_buf):
    """One Adam step per module with the mean micro-batch gradient."""
    tree = unpack(specs[s], buf)
    states = _stage_states(tree, s, num_stages)
    grads = unpack(param_specs[s], grads_buf)
    states = [feedforward.apply_gradients(
        tx, st, jax.tree.map(lambda g: g / M, g), st.batch_stats)
        for st, g in zip(states, grads)]
    return pack(specs[s], _stage_tree(states, s, num_stages), widths)

  def train_step_local(state: BackpropPipelineState, images, labels):
    s = lax.axis_index(STAGE_AXIS)
    local = _squeeze(state)
    images_mb = images.reshape((M, mb) + images.shape[1:])
    labels_mb = labels.reshape(M, mb)
    up = [(i, i + 1) for i in range(num_stages - 1)]
    down = [(i + 1, i) for i in range(num_stages - 1)]
    ticks = M + num_stages - 1

    # Fill: on tick f stage s runs micro-batch f - s forward.
    def forward_tick(carry, f):
      buf, x_flat, stash, loss_sum = carry
      m = f - s
      valid = (m >= 0) & (m < M)
      mc = jnp.clip(m, 0, M - 1)
      new_buf, h_flat, loss = lax.switch(
          s, _branches(forward_branch, num_stages),
          buf, images_mb[mc], labels_mb[mc], x_flat)
      buf = _keep(valid, new_buf, buf)
      stash = stash.at[mc].set(jnp.where(valid, x_flat, stash[mc]))
      loss_sum = loss_sum + jnp.where(valid, loss, 0.0)
      x_flat = lax.ppermute(h_flat, STAGE_AXIS, up)
      return (buf, x_flat, stash, loss_sum), None

    zeros = jnp.zeros((mb, width), jnp.float32)
    stash = jnp.zeros((M, mb, width), jnp.float32)
    (buf, _, stash, loss_sum), _ = lax.scan(
        forward_tick,
        _mark_varying((local.blocks, zeros, stash, jnp.zeros(()))),
        jnp.arange(ticks))

    # Drain: on tick b stage s runs micro-batch b - (S - 1 - s) backward.
    def backward_tick(carry, b):
      grads_buf, g_flat = carry
      m = b - (num_stages - 1 - s)
      valid = (m >= 0) & (m < M)
      mc = jnp.clip(m, 0, M - 1)
      new_grads, grad_x = lax.switch(
          s, _branches(backward_branch, num_stages),
          buf, grads_buf, images_mb[mc], labels_mb[mc], stash[mc], g_flat)
      grads_buf = _keep(valid, new_grads, grads_buf)
      g_flat = lax.ppermute(grad_x, STAGE_AXIS, down)
      return (grads_buf, g_flat), None

    grads0 = {d: jnp.zeros((w,), d) for d, w in param_widths.items()}
    (grads_buf, _), _ = lax.scan(backward_tick, _mark_varying((grads0, zeros)),
                                 jnp.arange(ticks))
    buf = lax.switch(s, _branches(apply_branch, num_stages), buf, grads_buf)
    metrics = {'loss': loss_sum / M}
    return (_expand(BackpropPipelineState(buf, local.step + 1)),
            _expand(metrics))

  def train_step(state, images, labels):
    new_state, per_stage = jax.shard_map(
        train_step_local, mesh=mesh, in_specs=(stage_spec, jax.P(), jax.P()),
        out_specs=(stage_spec, stage_spec))(state, images, labels)
    return new_state, {'loss': per_stage['loss'][-1]}

  @jax.jit
  def stack(ff_state):
    bufs = []
    for s, st in enumerate(stages):
      tree = (tuple(ff_state.layers[i] for i in st),)
      if s == num_stages - 1:
        tree += (ff_state.head,)
      bufs.append(pack(specs[s], tree, widths))
    return BackpropPipelineState(
        {d: jnp.stack([b[d] for b in bufs]) for d in widths},
        jnp.full((num_stages,), ff_state.step, jnp.int32))

  def from_feedforward(ff_state):
    """An empty pipeline holding `ff_state`'s modules (host round trip, so it
    works across processes)."""
    return jax.tree.map(lambda v: global_array(mesh, stage_spec, v),
                        jax.device_get(stack(ff_state)))

  def init(rng):
    return from_feedforward(jax.jit(init_ff)(rng))

  def to_feedforward(state):
    layer_states, head = {}, None
    for s, st in enumerate(stages):
      tree = unpack(specs[s], {d: b[s] for d, b in state.blocks.items()})
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
  return BackpropPipeline(
      config=config, modules=modules, stages=stages, num_microbatches=M,
      mesh=mesh, init=init, from_feedforward=from_feedforward,
      to_feedforward=wrap(to_feedforward),
      train_step=wrap(train_step, donate_argnums=(0,) if donate else ()),
      eval_batch=wrap(eval_batch), train_step_local=train_step_local)

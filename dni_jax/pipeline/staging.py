"""Staging shared by every pipeline: the `stage` mesh, placing a network's
module states on stages and back, the messages that cross stages, and the
per-stage metrics gathered into `training.fit`'s contract.

A network of blocks is split into stages: stage s holds the hidden layers
`stages[s]` (0-based), the top stage also the classifier, and every stage
below the top the synthetic-gradient model on its output interface (the
decoupled pipelines; GPipe has none). `stage_trees` and `merge_stages`
convert between a `FeedForwardState` and these per-stage trees;
`place_stages` and `slice_stages` add and remove the SPMD pipelines' leading
stage axis [S, ...] (stage s's values at index s, zero placeholders
elsewhere; see docs/architecture/pipeline.md).
"""

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from dni_jax import feedforward
from dni_jax import parallel

Array = jax.Array
STAGE_AXIS = 'stage'


# ---------------------------------------------------------------------------
# The mesh and placement.
# ---------------------------------------------------------------------------

def stage_mesh(num_stages: int, devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis `stage` over the first `num_stages` devices."""
  devices = jax.devices() if devices is None else devices
  if len(devices) < num_stages:
    raise ValueError(f'{num_stages} stages need {num_stages} devices; '
                     f'{len(devices)} are available')
  return jax.make_mesh((num_stages,), (STAGE_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:num_stages])


def global_array(mesh, spec, value) -> Array:
  """A host value as a global array with `NamedSharding(mesh, spec)`; works
  with several processes, each holding the same value."""
  return parallel.global_array(value, jax.sharding.NamedSharding(mesh, spec))


def on_stages(mesh, tree):
  """A stage-placed tree (every leaf [S, ...]) as global arrays split over
  the mesh's stages (a host round trip, so it works across processes)."""
  spec = jax.P(STAGE_AXIS)
  return jax.tree.map(lambda v: global_array(mesh, spec, v),
                      jax.device_get(tree))


def place_stage(tree, s: int, num_stages: int):
  """Stage s's pytree with a leading stage axis [S, ...]: its own values at
  index s, zero placeholders at the other stages."""
  return jax.tree.map(
      lambda x: jnp.zeros((num_stages,) + x.shape, x.dtype).at[s].set(x), tree)


def stage_slice(tree, s: int):
  """Inverse of `place_stage`: row s of every leaf."""
  return jax.tree.map(lambda x: x[s], tree)


def place_stages(trees) -> tuple:
  """One tree per stage -> each placed on its own stage (`place_stage`)."""
  return tuple(place_stage(t, s, len(trees)) for s, t in enumerate(trees))


def slice_stages(placed) -> list:
  """Inverse of `place_stages`."""
  return [stage_slice(t, s) for s, t in enumerate(placed)]


# ---------------------------------------------------------------------------
# A network's module states per stage.
# ---------------------------------------------------------------------------

class PipelineLayout(NamedTuple):
  """Static facts of a staged network."""
  stages: tuple[tuple[int, ...], ...]   # Hidden layers (0-based) per stage.
  input_shapes: tuple[tuple[int, ...], ...]   # Per example, per stage.
  output_shapes: tuple[tuple[int, ...], ...]  # Per example, stages 0..S-2.
  width: int                                  # D.
  batch_size: int


def stage_trees(stages, ff_state: feedforward.FeedForwardState):
  """Per stage: (layer states [, head on top]), and the synthetic-gradient
  state on its output interface (() on the top stage, and on every stage of
  a network without synthetic gradients)."""
  blocks, synth = [], []
  for s, stage in enumerate(stages):
    layer_states = tuple(ff_state.layers[i] for i in stage)
    if s == len(stages) - 1:
      blocks.append((layer_states, ff_state.head))
      synth.append(())
    else:
      blocks.append((layer_states,))
      synth.append(ff_state.synthetic[s] if ff_state.synthetic else ())
  return blocks, synth


def merge_stages(stages, blocks, synthetic,
                 step: Array) -> feedforward.FeedForwardState:
  """Inverse of `stage_trees`: `synthetic` holds the stages below the top
  (or is () for a network without synthetic gradients)."""
  layer_states = {}
  for stage, block in zip(stages, blocks):
    layer_states.update(zip(stage, block[0]))
  return feedforward.FeedForwardState(
      tuple(layer_states[i] for i in sorted(layer_states)), blocks[-1][1],
      tuple(synthetic), step)


def stage_models(modules: feedforward.Modules, stages, s: int) -> tuple:
  """The Flax definitions of stage s's modules (layers [+ classifier])."""
  models = tuple(modules.hidden[i] for i in stages[s])
  return models + ((modules.head,) if s == len(stages) - 1 else ())


def block_states(block) -> list:
  """A stage's block -> its module states (layers [+ classifier])."""
  return list(block[0]) + list(block[1:])


def block_of(states, top: bool) -> tuple:
  """Inverse of `block_states`."""
  if top:
    return (tuple(states[:-1]), states[-1])
  return (tuple(states),)


def _activation_shapes(modules, config, ff_state_shape):
  """Per-example output shape of every hidden layer (abstract evaluation)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(config.input_shape), jnp.float32)
  shapes = []
  for i, layer_state in enumerate(ff_state_shape.layers):
    x = jax.eval_shape(functools.partial(feedforward.hidden_forward, modules,
                                         i, train=False), layer_state, x)
    shapes.append(tuple(x.shape[1:]))
  return shapes


def stage_layout(config: feedforward.FeedForwardConfig, modules, stages,
                 batch_size: int) -> PipelineLayout:
  """The static layout of `config`'s network split into `stages` (no
  devices involved)."""
  ff_state_shape = jax.eval_shape(
      functools.partial(feedforward.init, modules, config), jax.random.key(0))
  shapes = _activation_shapes(modules, config, ff_state_shape)
  # A stage reads the output of the stage below (the top stage may hold no
  # hidden layer, only the classifier).
  input_shapes = tuple([tuple(config.input_shape)]
                       + [shapes[below[-1]] for below in stages[:-1]])
  output_shapes = tuple(shapes[stage[-1]] for stage in stages[:-1])
  width = max(math.prod(s) for s in output_shapes)
  return PipelineLayout(tuple(stages), input_shapes, output_shapes, width,
                        batch_size)


def pipeline_layout(config: feedforward.FeedForwardConfig, modules,
                    batch_size: int) -> PipelineLayout:
  """The static layout of `config`'s stages, one per block."""
  return stage_layout(config, modules, config.blocks, batch_size)


def stack_stages(layout: PipelineLayout, ff_state: feedforward.FeedForwardState):
  """FeedForwardState -> (blocks, synthetic), one stage-placed tree per
  stage (`place_stage`)."""
  blocks, synth = stage_trees(layout.stages, ff_state)
  return place_stages(blocks), place_stages(synth)


def unstack_stages(layout: PipelineLayout, blocks, synthetic,
                   step: Array) -> feedforward.FeedForwardState:
  """Inverse of `stack_stages`."""
  return merge_stages(layout.stages, slice_stages(blocks),
                      slice_stages(synthetic)[:-1], step)


# ---------------------------------------------------------------------------
# Messages between stages, and per-stage values under shard_map.
# ---------------------------------------------------------------------------

def flatten_examples(x: Array, width: int) -> Array:
  """[B, ...] -> [B, width], zero-padded (activations crossing stages)."""
  flat = x.reshape(x.shape[0], -1)
  return jnp.pad(flat, ((0, 0), (0, width - flat.shape[1])))


def unflatten_examples(flat: Array, shape: tuple[int, ...]) -> Array:
  return flat[:, :math.prod(shape)].reshape((flat.shape[0],) + shape)


def column(x: Array, batch: int) -> Array:
  """[B] or a scalar -> [B, 1] float32."""
  return jnp.broadcast_to(x.astype(jnp.float32).reshape(-1, 1), (batch, 1))


def message(h_flat: Array, labels: Array, valid: Array) -> Array:
  """What a stage sends up: [B, D + 2] float32, the activation, its labels
  (as floats: exact below 2**24) and the validity flag in one message."""
  return jnp.concatenate([h_flat, column(labels, h_flat.shape[0]),
                          column(valid, h_flat.shape[0])], axis=1)


def read_message(msg: Array, width: int):
  """Inverse of `message`: (h_flat, labels, valid)."""
  return (msg[:, :width], msg[:, width].astype(jnp.int32),
          msg[0, width + 1] > 0)


def shift_up(num_stages: int):
  """`ppermute` pairs of a cyclic shift one stage up."""
  return [(i, (i + 1) % num_stages) for i in range(num_stages)]


def shift_down(num_stages: int):
  """`ppermute` pairs of a cyclic shift one stage down."""
  return [(i, (i - 1) % num_stages) for i in range(num_stages)]


def exchange(num_stages: int, s: Array, up_message: Array,
             down_message: Array):
  """Sends `up_message` one stage up and `down_message` one stage down (equal
  shapes); returns (from_below, from_above). Both are cyclic shifts, so in
  each collective every device sends and receives: over gloo a one-way
  permute, where one side only waits, measured several times slower. With two
  stages both directions are the same shift: one collective per tick. What
  wraps around (stage 0 from the top, the top from stage 0) is no message and
  must be ignored."""
  up = shift_up(num_stages)
  if num_stages == 2:
    received = lax.ppermute(jnp.where(s == 0, up_message, down_message),
                            STAGE_AXIS, up)
    return received, received
  return (lax.ppermute(up_message, STAGE_AXIS, up),
          lax.ppermute(down_message, STAGE_AXIS, shift_down(num_stages)))


def from_top_stage(num_stages: int, x: Array) -> Array:
  """A value that only the top stage holds (the others hold zeros) -> the
  top stage's, on every stage: with two stages one cyclic permute, else an
  all-reduce."""
  on_top = lax.axis_index(STAGE_AXIS) == num_stages - 1
  if num_stages == 2:
    received = lax.ppermute(x, STAGE_AXIS, shift_up(2))
    return jnp.where(on_top, x, received)
  return lax.psum(jnp.where(on_top, x, 0.0), STAGE_AXIS)


def same_on_every_stage(mesh, x: Array) -> Array:
  """[S, ...] holding the same bits on every stage -> one replicated [...]
  value, with no collective (each device keeps its own copy; `check_vma` off
  because JAX cannot know they are equal)."""
  return jax.shard_map(lambda v: v[0], mesh=mesh, in_specs=jax.P(STAGE_AXIS),
                       out_specs=jax.P(), check_vma=False)(x)


def mark_varying(tree):
  """Marks every array as varying over `stage` (a per-stage value), so that
  cond branches and scan carries have equal types under shard_map."""
  def mark(x):
    if STAGE_AXIS in jax.typeof(x).mat.varying:
      return x
    return lax.pcast(x, (STAGE_AXIS,), to='varying')
  return jax.tree.map(mark, tree)


def varying(fn):
  """`fn` with every output marked as varying over `stage`."""
  @functools.wraps(fn)
  def wrapped(*args):
    return mark_varying(fn(*args))
  return wrapped


def squeeze(tree):
  return jax.tree.map(lambda a: a[0], tree)


def expand(tree):
  return jax.tree.map(lambda a: a[None], tree)


def select_stage(s: Array, per_stage: list):
  """Stage s's value of each leaf, from a list with one pytree per stage."""
  return jax.tree.map(lambda *xs: lax.select_n(s, *xs), *per_stage)


# The metrics that belong to an interface (the stage's output): the top
# stage has none, its entries are 0 / False.
INTERFACE_METRICS = ('sg_loss', 'sg_updated', 'synthetic_gradient_finite')


def tick_metrics(per_stage: dict[str, Array], top: Array) -> dict[str, Array]:
  """Per-stage metrics [K, S] and the top stage's [loss, accuracy] [K, 2] ->
  a tick's metrics with a leading K axis: loss and accuracy of the top stage,
  the others per stage [K, S], still where each stage computed them (no
  collective: slicing the top stage off inside the program would make XLA
  gather them, one all-reduce per metric per tick). `interface_metrics`
  gives the fused step's per-interface view."""
  return {
      'loss': top[:, 0],
      'accuracy': top[:, 1],
      'sg_loss': per_stage['sg_loss'],
      'block_updated': per_stage['updated'],
      'sg_updated': per_stage['sg_updated'],
      'activation_finite': per_stage['activation_finite'],
      'layer_finite': per_stage['layer_finite'],
      'synthetic_gradient_finite': per_stage['synthetic_gradient_finite'],
  }


def interface_metrics(metrics: dict[str, Array]) -> dict[str, Array]:
  """A pipeline tick's metrics (per stage, last axis S) -> the `training.fit`
  contract of the fused step: sg_loss, sg_updated and
  synthetic_gradient_finite per interface (S - 1, the top stage's entry
  dropped). Apply it where the metrics are read (one device, or the host)."""
  return {k: v[..., :-1] if k in INTERFACE_METRICS else v
          for k, v in metrics.items()}


def donation(donate: bool | None) -> dict:
  """jax.jit's options donating argument 0 (the state) where `donate`
  (None: on for accelerators, off on CPU)."""
  if donate is None:
    donate = jax.default_backend() != 'cpu'
  return {'donate_argnums': (0,) if donate else ()}


def jit_or_not(jit: bool):
  """jax.jit, or the function itself (keyword options ignored)."""
  return jax.jit if jit else (lambda f, **_: f)


def update_own_stage(s: Array, active: Array, update, keep, trees, *args):
  """One `lax.cond` per stage k: on stage k's device, where `active`,
  `update(k, trees[k], *args)`, elsewhere `keep(trees[k], *args)`, which
  leaves the placeholders of the other stages' modules untouched, in place
  (a `lax.switch` returning every stage's modules from every branch would
  copy them). Both return (new tree, *outputs). Returns (the new trees, the
  outputs of stage s)."""
  new_trees, outs = [], []
  for k, tree in enumerate(trees):
    tree, *out = lax.cond((s == k) & active,
                          varying(functools.partial(update, k)),
                          varying(keep), tree, *args)
    new_trees.append(tree)
    outs.append(out)
  return tuple(new_trees), select_stage(s, outs)

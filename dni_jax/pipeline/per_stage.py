"""The decoupled DNI pipeline as one program per stage (MPMD), no placeholders.

Each stage is its own jitted program, committed to its own device, and the
host dispatches them; the protocol is the SPMD tick's, through the same
functions (`decoupled.stage_block_phase` and `decoupled.stage_synthetic_phase`),
so it computes what `make_pipeline(...).tick` computes
(tests/test_device_pipeline.py):

  1. stage s updates its block from its own synthetic gradient (the top stage:
     from the loss), on the activation its predecessor sent last tick (stage
     0: this tick's data); a stage without a valid input keeps its state;
  2. its output h (with labels and validity) moves up one stage, the input
     gradient it pulled back down one stage, with `jax.device_put`;
  3. stage s regresses its synthetic-gradient model onto the target just
     received, at the activation it sent last tick.

Device s holds only stage s's modules (no placeholders), and stages compile
on their own. Why, and what it costs, is in docs/architecture/pipeline.md.
"""

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from dni_jax import feedforward
from dni_jax.pipeline import decoupled
from dni_jax.pipeline import staging
from dni_jax.pipeline.staging import PipelineLayout

Array = jax.Array


class StageState(NamedTuple):
  """State of one stage, every leaf committed to that stage's device (B:
  batch size, D: the widest interface of the network, flattened per
  example)."""
  block: tuple       # (layer states,) or, on the top stage, (layer states,
                     # classifier state): as `decoupled.PipelineState.blocks`,
                     # without the stage axis.
  synthetic: Any     # The synthetic-gradient model on the stage's output
                     # interface (a ModuleState); () on the top stage.
  inputs: Array      # [B, D] float32: what the stage reads next tick, its
                     # predecessor's last output (stage 0: unused zeros).
  input_labels: Array  # [B] int32: their labels (stage 0: unused zeros).
  input_valid: Array   # [] bool: a real batch (false while filling; always
                       # false on stage 0, which reads the data).
  outputs: Array       # [B, D] float32: the stage's output last tick, where
                       # its synthetic-gradient model is regressed once the
                       # target for it arrives (top stage: zeros).
  output_labels: Array  # [B] int32.
  output_valid: Array   # [] bool.
  step: Array           # [] int32: ticks taken.


class DevicePipelineState(NamedTuple):
  """The stages' states, bottom up; stage s lives on `devices[s]`."""
  stages: tuple[StageState, ...]


class DevicePipeline(NamedTuple):
  """What `make_device_pipeline` returns.

    init(rng) -> DevicePipelineState      (the same weights as ff.init(rng))
    from_feedforward(ff_state) -> DevicePipelineState   (empty pipeline)
    to_feedforward(state) -> FeedForwardState   (gathered on devices[0])
    tick(state, images, labels) -> (state, metrics)   (a train_step; metrics
        as `make_pipeline`'s tick, stacked over stages on
        devices[0])
    eval_batch(state, images, labels) -> sums   (all layers connected)
    place(state) -> state    stage s on devices[s] (a no-op for a state
        already there; e.g. after restoring a checkpoint onto one device)
  """
  config: feedforward.FeedForwardConfig
  modules: feedforward.Modules
  layout: PipelineLayout
  devices: tuple
  init: Callable
  from_feedforward: Callable
  to_feedforward: Callable
  tick: Callable
  eval_batch: Callable
  place: Callable


def _block_program(modules, layout: PipelineLayout, s: int, block,
                   synthetic_state, x_flat: Array, x_labels: Array,
                   x_valid: Array, images: Array | None,
                   labels: Array | None):
  """Phase 1 of stage s (static) as one device program: the block update of
  `decoupled.stage_block_phase` where the stage's input is valid (stage 0:
  always), else the state kept. Returns (block, h_flat, grad_flat, y, valid,
  metrics)."""
  batch = x_labels.shape[0]
  zeros = jnp.zeros((batch, layout.width), jnp.float32)

  def update(block):
    return decoupled.stage_block_phase(
        modules, layout, s, block, synthetic_state, images,
        labels if s == 0 else x_labels, x_flat, x_labels)

  def keep(block):
    skip = decoupled.skip_metrics()
    return block, zeros, zeros, x_labels, skip

  if s == 0:
    valid = jnp.ones((), jnp.bool_)
    out = update(block)
  else:
    valid = x_valid
    out = lax.cond(valid, update, keep, block)
  new_block, h_flat, grad_flat, y, metrics = out
  return new_block, h_flat, grad_flat, y, valid, metrics


def _synthetic_program(modules, layout: PipelineLayout, s: int,
                       synthetic_state, outputs: Array, output_labels: Array,
                       output_valid: Array, step: Array, target: Array | None):
  """Phase 3 of stage s (static): `decoupled.stage_synthetic_phase` where the
  stage sent a valid output last tick (so `target`, its successor's input
  gradient of this tick, is real). Returns (synthetic, sg_loss, sg_updated,
  step + 1)."""
  zero = jnp.zeros((), jnp.float32)
  if s == len(layout.stages) - 1:
    return synthetic_state, zero, jnp.zeros((), jnp.bool_), step + 1

  def update(sg_state):
    return decoupled.stage_synthetic_phase(modules, layout, s, sg_state,
                                          outputs, output_labels, target)

  synthetic_state, sg_loss = lax.cond(
      output_valid, update, lambda sg_state: (sg_state, zero),
      synthetic_state)
  return synthetic_state, sg_loss, output_valid, step + 1


def _gather_metrics(per_stage: Sequence[dict[str, Array]]) -> dict[str, Array]:
  """Per-stage metric dicts (one device) -> the metrics of
  `make_pipeline`'s tick (`staging.tick_metrics`)."""
  stacked = {name: jnp.stack([m[name] for m in per_stage])[None]
             for name in per_stage[0]}
  top = jnp.stack([per_stage[-1]['loss'], per_stage[-1]['accuracy']])[None]
  return jax.tree.map(lambda m: m[0], staging.tick_metrics(stacked, top))


def make_device_pipeline(config: feedforward.FeedForwardConfig,
                         batch_size: int, devices=None,
                         donate: bool | None = None) -> DevicePipeline:
  """The decoupled pipeline of `config`, one jitted program per stage (one
  stage per block of `config`) on `devices[s]` (default: the first S of
  `jax.devices()`). `donate` (default: on for accelerators) donates each
  stage's block to its phase-1 program and its synthetic-gradient model to
  its phase-3 program, so they are updated in place."""
  decoupled.check_dni_config(config)
  num_stages = len(config.blocks)
  devices = tuple(jax.devices() if devices is None else devices)
  if len(devices) < num_stages:
    raise ValueError(f'{num_stages} stages need {num_stages} devices; '
                     f'{len(devices)} devices are available')
  devices = devices[:num_stages]
  modules = feedforward.build_modules(config)
  init_ff = jax.jit(functools.partial(feedforward.init, modules, config))
  layout = staging.pipeline_layout(config, modules, batch_size)
  donation = staging.donation(donate)
  top = num_stages - 1

  # Jitted once per stage; each runs where its (committed) arguments live.
  block_programs = tuple(
      jax.jit(functools.partial(_block_program, modules, layout, s),
              **donation) for s in range(num_stages))
  synthetic_programs = tuple(
      jax.jit(functools.partial(_synthetic_program, modules, layout, s),
              **donation) for s in range(num_stages))
  gather_metrics = jax.jit(_gather_metrics)
  ff_eval = jax.jit(functools.partial(feedforward.eval_batch, modules))

  def from_feedforward(ff_state: feedforward.FeedForwardState
                       ) -> DevicePipelineState:
    """An empty pipeline holding `ff_state`'s modules, stage s on
    devices[s]."""
    blocks, synth = staging.stage_trees(layout.stages, ff_state)
    B, D = batch_size, layout.width
    stages = []
    for s, device in enumerate(devices):
      stage = StageState(
          block=blocks[s], synthetic=synth[s],
          inputs=jnp.zeros((B, D), jnp.float32),
          input_labels=jnp.zeros((B,), jnp.int32),
          input_valid=jnp.zeros((), jnp.bool_),
          outputs=jnp.zeros((B, D), jnp.float32),
          output_labels=jnp.zeros((B,), jnp.int32),
          output_valid=jnp.zeros((), jnp.bool_),
          step=jnp.asarray(ff_state.step, jnp.int32))
      stages.append(jax.device_put(stage, device))
    return DevicePipelineState(tuple(stages))

  def init(rng) -> DevicePipelineState:
    return from_feedforward(init_ff(rng))

  def to_feedforward(state: DevicePipelineState
                     ) -> feedforward.FeedForwardState:
    """All stages' modules as one FeedForwardState on devices[0] (a copy of
    the whole network onto one device)."""
    ff_state = staging.merge_stages(
        layout.stages, [stage.block for stage in state.stages],
        [stage.synthetic for stage in state.stages[:-1]],
        state.stages[0].step)
    return jax.device_put(ff_state, devices[0])

  def tick(state: DevicePipelineState, images: Array, labels: Array):
    """One tick of every stage; returns (state, metrics on devices[0])."""
    images, labels = jax.device_put((images, labels), devices[0])
    # 1. Every stage's block update, dispatched without waiting.
    phase1 = []
    for s, stage in enumerate(state.stages):
      phase1.append(block_programs[s](
          stage.block, stage.synthetic, stage.inputs, stage.input_labels,
          stage.input_valid, images if s == 0 else None,
          labels if s == 0 else None))
    # 2. Activations (labels, validity) up, input gradients down.
    from_below = [None] + [
        jax.device_put((h, y, valid), devices[s + 1])
        for s, (_, h, _, y, valid, _) in enumerate(phase1[:-1])]
    targets = [jax.device_put(phase1[s + 1][2], devices[s])
               for s in range(top)] + [None]
    # 3. Every stage's synthetic-gradient regression; the new states.
    stages, per_stage = [], []
    for s, stage in enumerate(state.stages):
      block, h_flat, _, y, valid, metrics = phase1[s]
      synthetic, sg_loss, sg_updated, step = synthetic_programs[s](
          stage.synthetic, stage.outputs, stage.output_labels,
          stage.output_valid, stage.step, targets[s])
      if s == 0:
        inputs = (stage.inputs, stage.input_labels, stage.input_valid)
      else:
        inputs = from_below[s]
      stages.append(StageState(block, synthetic, *inputs, h_flat, y, valid,
                               step))
      per_stage.append(dict(metrics, sg_loss=sg_loss, updated=valid,
                            sg_updated=sg_updated))
    metrics = gather_metrics(jax.device_put(per_stage, devices[0]))
    return DevicePipelineState(tuple(stages)), metrics

  def eval_batch(state: DevicePipelineState, images: Array, labels: Array):
    return ff_eval(to_feedforward(state),
                   *jax.device_put((images, labels), devices[0]))

  def place(state: DevicePipelineState) -> DevicePipelineState:
    return DevicePipelineState(tuple(
        jax.device_put(stage, device)
        for stage, device in zip(state.stages, devices)))

  return DevicePipeline(
      config=config, modules=modules, layout=layout, devices=devices,
      init=init, from_feedforward=from_feedforward,
      to_feedforward=to_feedforward, tick=tick, eval_batch=eval_batch,
      place=place)

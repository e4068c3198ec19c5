"""The pipeline suite behind `scripts/benchmark.py --suite pipeline`: the
decoupled cDNI pipeline and the GPipe baseline against all stages on one
device, per-stage compute and communication, its JSON and markdown.
Re-exported by `dni_jax.benchmarking`; its workers are started by
`dni_jax.bench_launcher`."""

import dataclasses
import functools
import statistics
from typing import Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from dni_jax import feedforward
from dni_jax import pipeline as pl
from dni_jax.bench_timing import markdown_table
from dni_jax.bench_timing import time_call
from dni_jax.bench_timing import time_dispatch
from dni_jax.bench_timing import time_steps

# The pipeline suite.
# ---------------------------------------------------------------------------

def _suite_base(spec: dict) -> dict:
  return dict(input_shape=tuple(spec['input_shape']), num_classes=10,
              num_layers=spec['num_layers'], hidden_size=spec['hidden_size'],
              sg_hidden_layers=0, sg_hidden_size=spec['hidden_size'],
              learning_rate=3e-5, lr_boundaries=(),
              dtype=spec.get('dtype', 'float32'))


def measured_layer_costs(spec: dict) -> tuple[list[float], float]:
  """Seconds of each layer's DNI update (a one-layer block with its synthetic
  gradient; the classifier from the loss) and of one synthetic-gradient
  update, measured on this device: what the stages are balanced with."""
  config = feedforward.FeedForwardConfig(method='cdni', **_suite_base(spec))
  ff = feedforward.make_feedforward(config)
  state = ff.init(jax.random.key(0))
  images, labels = (jnp.asarray(v) for v in _batch(spec))
  context = ff.context(labels)
  costs, x = [], images
  for i in range(config.num_layers - 1):
    args = ((i,), (state.layers[i],), state.synthetic[i], x, context)
    costs.append(time_call(ff.block_update, args, 2, 10))
    x = ff.hidden_forward(i, state.layers[i], x)
  costs.append(time_call(ff.head_update, (state.head, x, labels), 2, 10))
  sg = time_call(ff.synthetic_update, (state.synthetic[0], x, context, x), 2,
                 10)
  return costs, sg



def split_stage_times(spec: dict) -> dict[int, list[float]]:
  """Two stages: for every interface position k (after layer k), the
  seconds of each stage's work of one tick (`stage_compute_times`, alone on
  this device, minimum of 3 medians)."""
  times = {}
  for k in range(1, spec['num_layers'] - 1):
    dni, _, _ = pipeline_configs(dict(spec, boundaries=(k,)))
    runs = [stage_compute_times(dni, spec['batch_size'], 2, 10)
            for _ in range(3)]
    times[k] = [min(r[s] for r in runs) for s in range(2)]
  return times

def pipeline_configs(spec: dict):
  """The cDNI network of the suite with one stage per device, and the same
  layers trained by Bprop. Stage boundaries: `spec['boundaries']` (measured
  by `measured_layer_costs` and balanced), else balanced by `pl.fcn_costs`."""
  base = _suite_base(spec)
  boundaries = spec.get('boundaries')
  if boundaries is None:
    probe = feedforward.FeedForwardConfig(method='cdni', **base)
    costs, sg = pl.fcn_costs(probe)
    boundaries = pl.balanced_interfaces(spec['num_layers'],
                                        spec['num_stages'], costs, sg)
  boundaries = tuple(boundaries)
  dni = feedforward.FeedForwardConfig(method='cdni', dni_layers=boundaries,
                                      **base)
  bprop = feedforward.FeedForwardConfig(method='bprop', **base)
  return dni, bprop, boundaries


def _batch(spec: dict, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.random((spec['batch_size'],) + tuple(spec['input_shape']),
                      np.float32)
  labels = rng.integers(0, 10, spec['batch_size']).astype(np.int32)
  return images, labels


def _replicated(mesh, value):
  return pl.global_array(mesh, jax.P(), value)


def _stage_computations(config, batch_size) -> list[tuple[Callable, tuple]]:
  """Per stage: (jitted fn, args) doing that stage's work of one tick (both
  phases of `pipeline_tick_local` on its own modules: no collectives, no
  switch)."""
  modules = feedforward.build_modules(config)
  layout = pl.pipeline_layout(config, modules, batch_size)
  ff_state = jax.jit(functools.partial(feedforward.init, modules, config))(
      jax.random.key(0))
  blocks, synthetic = pl.stage_trees(layout.stages, ff_state)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random(
      (batch_size,) + tuple(config.input_shape), np.float32))
  labels = jnp.zeros((batch_size,), jnp.int32)
  acts = jnp.asarray(rng.random((batch_size, layout.width), np.float32))
  out = []
  for s in range(len(layout.stages)):
    def stage_compute(block, synthetic, images, labels, acts, s=s):
      new_block = pl.stage_block_phase(modules, layout, s, block, synthetic,
                                       images, labels, acts, labels)
      new_synthetic = pl.stage_synthetic_phase(modules, layout, s, synthetic,
                                               acts, labels, acts)
      return new_block, new_synthetic
    out.append((jax.jit(stage_compute),
                (blocks[s], synthetic[s], images, labels, acts)))
  return out


def stage_compute_times(config, batch_size, warmup, steps) -> list[float]:
  """Seconds of each stage's work in one tick, one stage after another on
  this device (`_stage_computations`)."""
  return [time_call(fn, args, warmup, steps)
          for fn, args in _stage_computations(config, batch_size)]


def _per_call(spec: dict, step: Callable, scanned: Callable, images,
              labels):
  """(step, args) running `spec['steps_per_call']` (K) training steps per
  call: `step` itself for K = 1, else `scanned` on K stacked copies of the
  batch (so the host dispatches and waits once per K steps)."""
  k = spec.get('steps_per_call', 1)
  if k == 1:
    return step, (images, labels)
  stack = lambda x: jnp.broadcast_to(x, (k,) + x.shape)
  return scanned, (jax.jit(stack)(images), jax.jit(stack)(labels))


def _time_per_step(spec: dict, step: Callable, state, args):
  """Median seconds per training step (calls of K steps / K), final state."""
  k = spec.get('steps_per_call', 1)
  times, state = time_steps(step, state, args, spec['warmup'], spec['steps'])
  return statistics.median(times) / k, state


def run_baseline(spec: dict) -> dict:
  """(1) All stages on one device, one after another: the fused cDNI step of
  the same network (and, for reference, the fused Bprop step), its state
  donated, K steps per call (`lax.scan`) as the pipelines get them."""
  out = {}
  if spec.get('balance') == 'measured' and spec.get('boundaries') is None:
    costs, sg = measured_layer_costs(spec)
    boundaries = pl.balanced_interfaces(spec['num_layers'],
                                        spec['num_stages'], costs, sg)
    out.update(layer_costs_s=costs, interface_cost_s=sg)
    if spec['num_stages'] == 2:
      # Two stages: time every split's stages as they run in a tick and
      # keep the one whose slower stage is fastest (summed layer costs
      # miss what a stage's layers cost together and move with noise).
      out['split_stage_times_s'] = split_stage_times(spec)
      boundaries = (min(out['split_stage_times_s'].items(),
                        key=lambda kv: max(kv[1]))[0],)
    spec = dict(spec, boundaries=boundaries)
  dni, bprop, boundaries = pipeline_configs(spec)
  out['boundaries'] = list(boundaries)
  images, labels = (jnp.asarray(v) for v in _batch(spec))
  for name, config in (('dni', dni), ('bprop', bprop)):
    ff = feedforward.make_feedforward(config, donate=True)

    def scanned(state, images, labels, modules=ff.modules):
      return jax.lax.scan(
          lambda st, batch: feedforward.train_step(modules, st, *batch),
          state, (images, labels))
    step, args = _per_call(spec, ff.train_step,
                           jax.jit(scanned, donate_argnums=0), images, labels)
    out[f'{name}_step_s'], state = _time_per_step(
        spec, step, ff.init(jax.random.key(0)), args)
    dispatch, _ = time_dispatch(step, state, args, spec['steps'])
    out[f'{name}_dispatch_s'] = dispatch / spec.get('steps_per_call', 1)
  out['stage_compute_s'] = stage_compute_times(
      dni, spec['batch_size'], spec['warmup'], spec['steps'])
  return out


def run_pipelines(spec: dict) -> dict:
  """(2) The decoupled pipeline and (3) the backprop pipeline over every
  device of the (possibly multi-process) runtime, one stage per device,
  states donated, K steps per call. Returns this process's measurements."""
  dni, bprop, boundaries = pipeline_configs(spec)
  num_stages = spec['num_stages']
  mesh = pl.stage_mesh(num_stages)
  images, labels = _batch(spec)
  images_g, labels_g = _replicated(mesh, images), _replicated(mesh, labels)
  out = {'process_index': jax.process_index()}

  pipe = pl.make_pipeline(dni, mesh, spec['batch_size'], donate=True)
  step, args = _per_call(spec, pipe.tick, pipe.ticks, images_g, labels_g)
  out['pipeline_tick_s'], state = _time_per_step(
      spec, step, pipe.init(jax.random.key(0)), args)
  # Host time per call until it returns (per tick with K ticks per call):
  # on a core shared with the computation it adds to the tick.
  dispatch, _ = time_dispatch(step, state, args, spec['steps'])
  out['pipeline_dispatch_s'] = dispatch / spec.get('steps_per_call', 1)

  # The communication of one tick on its own: the message up (activation,
  # labels, flag) and the gradient down, one collective each.
  B, D = spec['batch_size'], pipe.layout.width
  up = [(i, i + 1) for i in range(num_stages - 1)]
  down = [(i + 1, i) for i in range(num_stages - 1)]

  def communicate(message, gradient):
    return (jax.lax.ppermute(message, pl.STAGE_AXIS, up),
            jax.lax.ppermute(gradient, pl.STAGE_AXIS, down))
  comm = jax.jit(jax.shard_map(
      communicate, mesh=mesh, in_specs=jax.P(pl.STAGE_AXIS),
      out_specs=jax.P(pl.STAGE_AXIS)))
  spec_stage = jax.P(pl.STAGE_AXIS)
  out['communication_s'] = time_call(
      comm, (pl.global_array(mesh, spec_stage, np.zeros(
          (num_stages, B, D + 2), np.float32)),
             pl.global_array(mesh, spec_stage, np.zeros(
                 (num_stages, B, D), np.float32))),
      spec['warmup'], spec['steps'])
  # Up: the activation plus one column each for the label and the valid
  # flag; down: the gradient w.r.t. the activation.
  out['message_bytes_up'] = B * (D + 2) * 4
  out['message_bytes_down'] = B * D * 4

  if jax.process_count() > 1:
    # This process's stage alone on its device while every other process
    # times its own at the same moment (no collectives): what a stage costs
    # when all cores are busy at once, the floor of a tick on this host.
    stage = list(mesh.devices.flat).index(jax.local_devices()[0])
    fn, args = _stage_computations(dni, spec['batch_size'])[stage]
    jax.block_until_ready(fn(*args))
    multihost_utils.sync_global_devices('stage_compute_concurrent')
    out['stage'] = stage
    out['stage_compute_concurrent_s'] = time_call(fn, args, spec['warmup'],
                                                  spec['steps'])

  bp = pl.make_backprop_pipeline(bprop, mesh, spec['batch_size'], boundaries,
                                 spec['microbatches'], donate=True)
  step, args = _per_call(spec, bp.train_step, bp.train_steps, images_g,
                         labels_g)
  out['backprop_pipeline_step_s'], _ = _time_per_step(
      spec, step, bp.init(jax.random.key(0)), args)
  return out


def check_spec() -> dict:
  """A tiny two-stage network for the cross-process correctness test."""
  return {'mode': 'check', 'input_shape': [4, 4, 1], 'num_layers': 4,
          'hidden_size': 8, 'batch_size': 8, 'num_stages': 2, 'ticks': 3}


def run_check(spec: dict) -> dict:
  """Three ticks of the decoupled pipeline on fixed batches; returns this
  process's stage slices of the state (all of them in one process)."""
  dni, _, _ = pipeline_configs(spec)
  dni = dataclasses.replace(dni, learning_rate=1e-2)
  mesh = pl.stage_mesh(spec['num_stages'])
  pipe = pl.make_pipeline(dni, mesh, spec['batch_size'])
  state = pipe.init(jax.random.key(0))
  for tick in range(spec['ticks']):
    images, labels = _batch(spec, seed=tick)
    state, _ = pipe.tick(state, _replicated(mesh, images),
                         _replicated(mesh, labels))
  named = {f'blocks{jax.tree_util.keystr(path)}': leaf for path, leaf in
           jax.tree_util.tree_leaves_with_path(state.blocks)}
  named.update({f'synthetic{jax.tree_util.keystr(path)}': leaf
                for path, leaf in
                jax.tree_util.tree_leaves_with_path(state.synthetic)})
  named.update(inputs=state.inputs, outputs=state.outputs)
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in named.items()}
  return {k: np.asarray(v.addressable_shards[0].data[0]).tolist()
          for k, v in named.items()}



def summarize_pipeline(spec: dict, baseline: dict, workers: list[dict],
                       launcher: str) -> dict:
  """The suite's JSON: throughputs (examples/s) of (1) all stages on one
  device, (2) the decoupled pipeline, (3) the backprop pipeline; their
  ratios; per-stage compute and communication."""
  B = spec['batch_size']
  dni, _, boundaries = pipeline_configs(spec)
  tick = max(w['pipeline_tick_s'] for w in workers)
  bp_step = max(w['backprop_pipeline_step_s'] for w in workers)
  throughput = {
      'single_device': B / baseline['dni_step_s'],
      'dni_pipeline': B / tick,
      'backprop_pipeline': B / bp_step,
      'single_device_bprop': B / baseline['bprop_step_s'],
  }
  return {
      'suite': 'pipeline',
      'launcher': launcher,
      'network': {'method': 'cdni', 'dtype': spec.get('dtype', 'float32'),
                  'num_layers': spec['num_layers'],
                  'hidden_size': spec['hidden_size'],
                  'input_shape': spec['input_shape'], 'batch_size': B,
                  'stage_boundaries': list(boundaries),
                  'stages': [list(b) for b in dni.blocks]},
      'num_stages': spec['num_stages'],
      'microbatches': spec['microbatches'],
      'warmup': spec['warmup'], 'steps': spec['steps'],
      # Training steps (ticks) per dispatched call, all three ways; every
      # state is donated (updated in place).
      'steps_per_call': spec.get('steps_per_call', 1),
      'seconds_per_example': {k: 1.0 / v for k, v in throughput.items()},
      'examples_per_second': throughput,
      'pipeline_speedup': throughput['dni_pipeline'] / throughput[
          'single_device'],
      'backprop_pipeline_speedup': throughput['backprop_pipeline'] /
                                   throughput['single_device'],
      'single_device_step_s': baseline['dni_step_s'],
      'single_device_bprop_step_s': baseline['bprop_step_s'],
      'pipeline_tick_s': tick,
      'backprop_pipeline_step_s': bp_step,
      # Measured alone on one device (in the baseline's process).
      'stage_compute_s': baseline['stage_compute_s'],
      # Each worker's own stage, all workers at once (--processes only).
      'stage_compute_concurrent_s': [
          w['stage_compute_concurrent_s'] for w in sorted(
              workers, key=lambda w: w['stage'])] if all(
                  'stage' in w for w in workers) else None,
      'communication_s': max(w['communication_s'] for w in workers),
      # Host time per step until the call returns (dispatch), the slowest
      # worker's for the pipeline.
      'single_device_dispatch_s': baseline['dni_dispatch_s'],
      'pipeline_dispatch_s': max(w['pipeline_dispatch_s'] for w in workers),
      # What no schedule of these stages can beat: the one-device step over
      # the slowest stage's own work (timed with every core busy where
      # measured, else alone), i.e. a tick with free communication.
      'pipeline_speedup_bound': baseline['dni_step_s'] / max(
          w['stage_compute_concurrent_s'] for w in workers) if all(
              'stage_compute_concurrent_s' in w for w in workers) else
          baseline['dni_step_s'] / max(baseline['stage_compute_s']),
      'message_bytes_up': workers[0]['message_bytes_up'],
      'message_bytes_down': workers[0]['message_bytes_down'],
      'balance': spec.get('balance', 'flops'),
      'measured_layer_costs_s': baseline.get('layer_costs_s'),
      # Two stages: each split's stage times; the slowest-stage minimum won.
      'measured_split_stage_times_s': baseline.get('split_stage_times_s'),
      'measured_interface_cost_s': baseline.get('interface_cost_s'),
  }


def pipeline_markdown(result: dict) -> str:
  rows = [
      {'way': '(1) all stages on one ' + ('core' if result['launcher'] ==
                                          'processes' else 'device'),
       'ms per step': 1e3 * result['single_device_step_s'],
       'µs per example': 1e6 * result['seconds_per_example']['single_device'],
       'examples/s': result['examples_per_second']['single_device'],
       'vs (1)': 1.0},
      {'way': f'(2) decoupled cDNI pipeline, {result["num_stages"]} stages',
       'ms per step': 1e3 * result['pipeline_tick_s'],
       'µs per example': 1e6 * result['seconds_per_example']['dni_pipeline'],
       'examples/s': result['examples_per_second']['dni_pipeline'],
       'vs (1)': result['pipeline_speedup']},
      {'way': f'(3) backprop pipeline (GPipe, {result["microbatches"]} '
              'micro-batches)',
       'ms per step': 1e3 * result['backprop_pipeline_step_s'],
       'µs per example': 1e6 * result['seconds_per_example'][
           'backprop_pipeline'],
       'examples/s': result['examples_per_second']['backprop_pipeline'],
       'vs (1)': result['backprop_pipeline_speedup']},
      {'way': '(ref) Bprop, fused, one ' + ('core' if result['launcher'] ==
                                            'processes' else 'device'),
       'ms per step': 1e3 * result['single_device_bprop_step_s'],
       'µs per example': 1e6 * result['seconds_per_example'][
           'single_device_bprop'],
       'examples/s': result['examples_per_second']['single_device_bprop'],
       'vs (1)': result['examples_per_second']['single_device_bprop'] /
                 result['examples_per_second']['single_device']},
  ]
  table = markdown_table(rows, ['way', 'ms per step', 'µs per example',
                                'examples/s', 'vs (1)'])
  stages = ', '.join(f'{1e3 * t:.2f}' for t in result['stage_compute_s'])
  if result.get('stage_compute_concurrent_s'):
    stages += ' alone, ' + ', '.join(
        f'{1e3 * t:.2f}' for t in result['stage_compute_concurrent_s']) + (
            ' with every core busy at once')
  table += (f'\nPer-stage compute per tick (ms): {stages}; communication per '
            f'tick: {1e3 * result["communication_s"]:.2f} ms '
            f'({result["message_bytes_up"]} bytes up, '
            f'{result["message_bytes_down"]} bytes down per interface). '
            f'Host dispatch per step: '
            f'{1e3 * result["single_device_dispatch_s"]:.2f} ms (1), '
            f'{1e3 * result["pipeline_dispatch_s"]:.2f} ms (2). Speed-up '
            f'bound of (2) (one-device step / slowest stage): '
            f'{result["pipeline_speedup_bound"]:.2f}. '
            f'Steps per call: {result["steps_per_call"]}; stage '
            f'boundaries after layers {result["network"]["stage_boundaries"]}'
            '.\n')
  return table

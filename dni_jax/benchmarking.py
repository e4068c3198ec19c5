"""Benchmark logic behind `scripts/benchmark.py`: timing, FLOP/s, memory, the
pipeline suite and its pinned-process launcher.

Timing: median wall time of a step over `steps` steps after `warmup` steps,
each step followed by `jax.block_until_ready` (the same on CPU, GPU and TPU).

The pipeline suite can run in one process over the local devices (fake CPU
devices, or real accelerators) or, on a CPU host, as one process per device
pinned to its own core (`launch_workers`): JAX's multi-process runtime with
gloo collectives over 127.0.0.1, so every stage has compute of its own. The
worker is this module run as `python -m dni_jax.benchmarking SPEC OUT ...`.
"""

import dataclasses
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from dni_jax import bench_metrics as bmx
from dni_jax import feedforward
from dni_jax import pipeline as pl
from dni_jax import recurrent

# ---------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------


def load_average() -> list[float] | None:
  try:
    with open('/proc/loadavg') as f:
      return [float(v) for v in f.read().split()[:3]]
  except OSError:
    return None


def time_steps(step: Callable, state: Any, args: tuple, warmup: int,
               steps: int) -> tuple[list[float], Any]:
  """Runs `state, _ = step(state, *args)`; returns (seconds per timed step,
  final state)."""
  for _ in range(warmup):
    state, _ = step(state, *args)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = step(state, *args)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return times, state


def time_call(fn: Callable, args: tuple, warmup: int, steps: int) -> float:
  """Median seconds of a stateless call."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_info() -> dict:
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'num_devices': jax.device_count(),
          'num_processes': jax.process_count(),
          'cpu_cores': os.cpu_count()}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  def cell(v):
    if v is None:
      return '–'
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |'
            for r in rows]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# Single-device models and data parallelism.
# ---------------------------------------------------------------------------

MODEL_SIZES = {
    # MNIST sizes of A.1: 256 units / 64 filters, batch 256.
    'fcn': dict(model='fcn', input_shape=(28, 28, 1), hidden_size=256,
                sg_hidden_size=1024),
    'cnn': dict(model='cnn', input_shape=(28, 28, 1), hidden_size=64,
                sg_hidden_size=64),
    # Character-level PTB of A.3: an LSTM of 1024 units over 50 symbols,
    # T = 5 (the benchmark's unroll; A.3 uses T in 2..8).
    'lstm': dict(hidden_size=1024, vocab=50, unroll=5),
}
MODELS = tuple(MODEL_SIZES)
# Methods per model: the feed-forward ones, or the recurrent ones under the
# same names (bprop = truncated BPTT; dni_aux: DNI + Aux, recurrent only).
METHODS = {'fcn': ('bprop', 'dni', 'cdni'), 'cnn': ('bprop', 'dni', 'cdni'),
           'lstm': ('bprop', 'dni', 'dni_aux')}
ALL_METHODS = ('bprop', 'dni', 'cdni', 'dni_aux')


def model_config(model: str, method: str, num_layers: int = 4,
                 **overrides) -> feedforward.FeedForwardConfig:
  """A.1 sizes; cDNI FCN synthetic-gradient models are linear (A.1)."""
  sizes = dict(MODEL_SIZES[model])
  sg_layers = 0 if (method == 'cdni' and model == 'fcn') else 2
  sizes.update(overrides)
  return feedforward.FeedForwardConfig(
      num_classes=10, num_layers=num_layers, method=method,
      sg_hidden_layers=sg_layers, learning_rate=3e-5, lr_boundaries=(),
      **sizes)


def lstm_config(method: str, **overrides) -> recurrent.RecurrentConfig:
  """A.3's PTB LSTM (with `overrides` of hidden_size / vocab / unroll);
  `method` in the benchmark's names: bprop (truncated BPTT), dni, dni_aux."""
  sizes = dict(MODEL_SIZES['lstm'], **overrides)
  return recurrent.RecurrentConfig(
      core='lstm', input_size=sizes['vocab'], output_size=sizes['vocab'],
      hidden_size=sizes['hidden_size'], unroll=sizes['unroll'],
      method='bptt' if method == 'bprop' else method, loss='categorical')


def _model_batch(config, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.random((batch_size,) + tuple(config.input_shape), np.float32)
  labels = rng.integers(0, config.num_classes, batch_size).astype(np.int32)
  return images, labels


def lstm_chunk(config: recurrent.RecurrentConfig, batch_size: int,
               seed: int = 0) -> recurrent.Chunk:
  """Random symbols, every step scored, no episode boundary inside."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, config.unroll)
  return recurrent.Chunk(
      inputs=jnp.asarray(rng.integers(0, config.input_size, shape), jnp.int32),
      targets=jnp.asarray(rng.integers(0, config.output_size, shape),
                          jnp.int32),
      mask=jnp.ones(shape, jnp.float32), resets=jnp.zeros(shape, jnp.float32))


class RowSettings(NamedTuple):
  """How every row of a models run is timed and reported."""
  batch_size: int
  warmup: int
  steps: int
  dtype: str = 'float32'     # Compute dtype of the FCN / CNN layers.
  peak_flops: float | None = None   # None: `bench_metrics.peak_for(dtype)`.
  profile_steps: int = 0     # > 0: a jax.profiler trace of the fused step.
  profile_dir: str | None = None


def time_row(row: dict, settings: RowSettings, step: Callable, init: Callable,
             args: tuple, examples: int, flops: dict, stats: dict,
             profile: bool) -> dict:
  """Times `step` from `init()` and fills `row`'s columns (`flops`: the
  analytic counts, `stats`: the compiled step's `bench_metrics.
  compiled_stats`); with `profile`, writes a trace of
  `settings.profile_steps` steps under settings.profile_dir/ROW_NAME."""
  times, _ = time_steps(step, init(), args, settings.warmup, settings.steps)
  seconds = statistics.median(times)
  row.update(step_ms=1e3 * seconds, examples_per_step=examples)
  row.update(bmx.rate_fields(seconds, examples, flops, stats['hlo_flops'],
                             settings.peak_flops))
  row.update(peak_flops_per_s=settings.peak_flops,
             peak_memory_bytes=bmx.device_peak_memory_bytes(),
             compiled_memory_bytes=stats['compiled_memory_bytes'])
  if profile and settings.profile_steps > 0:
    name = '_'.join(str(row[k]) for k in ('model', 'method', 'dispatch',
                                          'dtype'))
    logdir = os.path.join(settings.profile_dir, name)
    files, _ = bmx.profile_steps(step, init(), args, settings.profile_steps,
                                 logdir)
    row['profile_files'] = files
  return row


def _lstm_rows(method, settings: RowSettings, overrides) -> list[dict]:
  config = lstm_config(method, **overrides)
  rec = recurrent.make_recurrent(config)
  chunk = lstm_chunk(config, settings.batch_size)
  init = lambda: rec.init(jax.random.key(0), settings.batch_size,
                          chunk.inputs)
  row = {'model': 'lstm', 'method': method, 'dispatch': 'fused',
         'dtype': 'float32', 'devices': 1, 'batch_size': settings.batch_size,
         'unroll': config.unroll, 'hidden_size': config.hidden_size}
  # XLA counts the unroll's scan body once: the FLOPs come from the same
  # step traced with the scans unrolled, the memory from the real program.
  stats = bmx.compiled_stats(rec.train_step, init(), chunk)
  stats['hlo_flops'] = bmx.scan_unrolled_flops(
      functools.partial(recurrent.train_step, config), init(), chunk)
  # One example = one character step: B x T per training step.
  return [time_row(row, settings, rec.train_step, init, (chunk,),
                   settings.batch_size * config.unroll,
                   bmx.recurrent_flops(config, settings.batch_size),
                   stats, True)]


def run_models_suite(models, methods, settings: RowSettings,
                     overrides=None) -> list[dict]:
  """Per model and method, on one device: median step time, steps/s,
  examples/s, HLO FLOPs of the compiled fused step (the per-layer schedule
  does the same arithmetic, so its rows carry the fused step's figures) and
  the analytic model FLOPs (`bench_metrics`), both as FLOP/s and as a
  fraction of the peak, peak device memory and the compiled step's memory.
  Feed-forward models are timed with the fused step and with one jitted call
  per module (`per_layer`); the LSTM's unroll is one jitted call (its
  examples are character steps, B x T per step; it runs in float32 only).
  Methods that do not apply to a model (cdni for the LSTM, dni_aux for
  FCN/CNN) are skipped. `overrides`: {model: {size field: value}}."""
  if settings.dtype != 'float32' and 'lstm' in models:
    raise ValueError(f'dtype={settings.dtype}: the recurrent rows (lstm) '
                     'run in float32 only; leave lstm out of the models')
  if settings.peak_flops is None:
    settings = settings._replace(
        peak_flops=bmx.peak_for(settings.dtype)[0])
  overrides = overrides or {}
  rows = []
  for model in models:
    for method in methods:
      if method not in METHODS[model]:
        continue
      if model == 'lstm':
        rows += _lstm_rows(method, settings, overrides.get(model, {}))
        continue
      config = model_config(model, method, dtype=settings.dtype,
                            **overrides.get(model, {}))
      ff = feedforward.make_feedforward(config)
      images, labels = (jnp.asarray(v) for v in _model_batch(
          config, settings.batch_size))
      init = lambda ff=ff: ff.init(jax.random.key(0))
      stats = bmx.compiled_stats(ff.train_step, init(), images, labels)
      flops = bmx.feedforward_flops(config, settings.batch_size)
      per_layer = lambda st, x, y, ff=ff: feedforward.per_layer_train_step(
          ff, st, x, y)
      for dispatch, step in (('fused', ff.train_step),
                             ('per_layer', per_layer)):
        row = {'model': model, 'method': method, 'dispatch': dispatch,
               'dtype': settings.dtype, 'devices': 1,
               'batch_size': settings.batch_size}
        rows.append(time_row(row, settings, step, init, (images, labels),
                             settings.batch_size, flops, stats,
                             dispatch == 'fused'))
  for row in rows:   # DNI/Bprop step-time ratio per model and dispatch.
    ref = next((r for r in rows if r['model'] == row['model'] and r[
        'dispatch'] == row['dispatch'] and r['method'] == 'bprop'), None)
    row['step_time_vs_bprop'] = (row['step_ms'] / ref['step_ms']
                                 if ref else None)
  return rows


def run_data_parallel_suite(model, method, device_counts, batch_size, warmup,
                            steps, overrides=None,
                            dtype: str = 'float32') -> list[dict]:
  """The fused step of `dni_jax.parallel.make_data_parallel` (batch split
  over the devices, states replicated) on 1..K devices; for the LSTM,
  `make_data_parallel_recurrent` (streams and their carried state split;
  float32 only). `dtype`: compute dtype of the FCN / CNN layers."""
  from dni_jax import parallel
  if dtype != 'float32' and model == 'lstm':
    raise ValueError(f'dtype={dtype}: the recurrent rows (lstm) run in '
                     'float32 only')
  overrides = overrides or {}
  rows = []
  for n in device_counts:
    mesh = parallel.make_data_mesh(n)
    if model == 'lstm':
      config = lstm_config(method, **overrides)
      rec = parallel.make_data_parallel_recurrent(config, mesh)
      chunk = jax.device_get(lstm_chunk(config, batch_size))
      step = rec.train_step
      args = (recurrent.Chunk(*parallel.shard_batch(mesh, *chunk)),)
      state = rec.init(jax.random.key(0), batch_size, chunk.inputs)
      examples = batch_size * config.unroll
    else:
      config = model_config(model, method, dtype=dtype, **overrides)
      ff = parallel.make_data_parallel(config, mesh)
      step = ff.train_step
      args = parallel.shard_batch(mesh, *_model_batch(config, batch_size))
      state = ff.init(jax.random.key(0))
      examples = batch_size
    times, _ = time_steps(step, state, args, warmup, steps)
    seconds = statistics.median(times)
    rows.append({'model': model, 'method': method, 'mode': 'data_parallel',
                 'dtype': dtype if model != 'lstm' else 'float32',
                 'devices': mesh.size, 'batch_size': batch_size,
                 'step_ms': 1e3 * seconds, 'steps_per_s': 1.0 / seconds,
                 'examples_per_step': examples,
                 'examples_per_s': examples / seconds})
  for row in rows:
    row['speedup_vs_1'] = rows[0]['step_ms'] / row['step_ms']
  return rows


# ---------------------------------------------------------------------------
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
    spec = dict(spec, boundaries=pl.balanced_interfaces(
        spec['num_layers'], spec['num_stages'], costs, sg))
    out.update(layer_costs_s=costs, interface_cost_s=sg)
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
    out[f'{name}_step_s'], _ = _time_per_step(
        spec, step, ff.init(jax.random.key(0)), args)
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
  out['pipeline_tick_s'], _ = _time_per_step(
      spec, step, pipe.init(jax.random.key(0)), args)

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


# ---------------------------------------------------------------------------
# The pinned-process launcher (CPU hosts).
# ---------------------------------------------------------------------------

def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch_workers(num_processes: int, spec: dict, workdir: str,
                   timeout: float = 600.0, pin: bool = True) -> list[dict]:
  """Starts `num_processes` workers on 127.0.0.1 (a free port), worker i
  pinned to core i with one CPU device, all in one JAX runtime with gloo
  collectives; returns each worker's result, by process id. For CPU hosts:
  on accelerator hosts start one process per host with the usual launcher
  and call `run_pipelines`."""
  if pin and num_processes > len(os.sched_getaffinity(0)):
    raise ValueError(f'--processes={num_processes} exceeds the '
                     f'{len(os.sched_getaffinity(0))} cores available')
  os.makedirs(workdir, exist_ok=True)
  spec_path = os.path.join(workdir, 'spec.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  port = free_port()
  cores = sorted(os.sched_getaffinity(0))
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)   # No fake-device settings from the parent.
  procs, outs = [], []
  for i in range(num_processes):
    out = os.path.join(workdir, f'worker{i}.json')
    outs.append(out)
    core = str(cores[i]) if pin else '-1'
    cmd = [sys.executable, '-m', 'dni_jax.benchmarking', spec_path, out,
           str(i), str(num_processes), str(port), core]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs, failed = [], False
  deadline = time.monotonic() + timeout
  for proc in procs:
    try:
      log, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in procs:
        if p.poll() is None:
          p.kill()
      log, _ = proc.communicate()
      failed = True
    logs.append(log)
    failed |= proc.returncode != 0
  if failed:
    raise RuntimeError('pipeline workers failed:\n' + '\n'.join(
        f'--- worker {i} ---\n{log[-3000:]}' for i, log in enumerate(logs)))
  results = []
  for out in outs:
    with open(out) as f:
      results.append(json.load(f))
  return results


def run_single_process(spec: dict, workdir: str, core: int | None,
                       timeout: float = 600.0) -> dict:
  """The baseline in a fresh process pinned to `core` (one CPU device)."""
  os.makedirs(workdir, exist_ok=True)
  spec_path = os.path.join(workdir, 'spec_single.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  out = os.path.join(workdir, 'single.json')
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'dni_jax.benchmarking', spec_path, out, '0',
         '1', '0', str(-1 if core is None else core)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f'baseline worker failed:\n{proc.stdout[-3000:]}'
                       f'{proc.stderr[-3000:]}')
  with open(out) as f:
    return json.load(f)


def worker_main(argv: list[str]) -> None:
  """`python -m dni_jax.benchmarking SPEC OUT PROCESS_ID NUM_PROCESSES PORT
  CORE`: one pinned worker; writes its result as JSON to OUT."""
  spec_path, out, process_id, num_processes, port, core = argv
  process_id, num_processes, core = int(process_id), int(num_processes), int(
      core)
  if core >= 0:
    os.sched_setaffinity(0, {core})
  with open(spec_path) as f:
    spec = json.load(f)
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', 1)
  if num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=120)
  mode = spec['mode']
  if mode == 'check':
    result = {'stage_state': run_check(spec)}
  elif mode == 'baseline':
    result = run_baseline(spec)
  elif mode == 'pipelines':
    result = run_pipelines(spec)
  else:
    raise ValueError(f'unknown worker mode {mode!r}')
  result['core'] = core
  with open(out, 'w') as f:
    json.dump(result, f)
  if num_processes > 1:
    jax.distributed.shutdown()


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
      'message_bytes_up': workers[0]['message_bytes_up'],
      'message_bytes_down': workers[0]['message_bytes_down'],
      'balance': spec.get('balance', 'flops'),
      'measured_layer_costs_s': baseline.get('layer_costs_s'),
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
            f'Steps per call: {result["steps_per_call"]}; stage '
            f'boundaries after layers {result["network"]["stage_boundaries"]}'
            '.\n')
  return table


if __name__ == '__main__':
  worker_main(sys.argv[1:])

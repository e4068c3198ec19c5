"""Benchmark logic behind `scripts/benchmark.py`: timing, FLOP/s, memory, the
pipeline suite and its pinned-process launcher.

Timing: median wall time of a step over `steps` steps after `warmup` steps,
each step followed by `jax.block_until_ready` (the same on CPU, GPU and TPU).

The pipeline suite can run in one process over the local devices (fake CPU
devices, or real accelerators) or, on a CPU host, as one process per device
pinned to its own core (`launch_workers`): JAX's multi-process runtime with
gloo collectives over 127.0.0.1, so every stage has compute of its own. The
worker is this module run as `python -m dni_jax.benchmarking SPEC OUT ...`.

The timing helpers live in `bench_timing`, the pipeline suite in
`bench_pipeline`, its launcher in `bench_launcher`; all are importable from
here. This module holds the single-device and data-parallel suites.
"""

import functools
import os
import statistics
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import bench_metrics as bmx
from dni_jax import feedforward
from dni_jax import recurrent
# pylint: disable=unused-import
# The timing, the pipeline suite and its launcher, importable from here as
# before.
from dni_jax.bench_launcher import (
    free_port, launch_workers, run_single_process, worker_main)
from dni_jax.bench_pipeline import (
    _batch, check_spec, measured_layer_costs, _per_call, pipeline_configs,
    pipeline_markdown, _replicated, run_baseline, run_check, run_pipelines,
    _stage_computations, stage_compute_times, _suite_base,
    summarize_pipeline, _time_per_step)
from dni_jax.bench_timing import (
    device_info, load_average, markdown_table, time_call, time_steps)
# pylint: enable=unused-import


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


if __name__ == '__main__':
  worker_main(sys.argv[1:])

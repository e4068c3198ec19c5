"""What a benchmark row reports besides its time: model FLOPs counted
analytically, the peak they are compared with (measured on CPU, datasheet on
GPU/TPU), XLA's own FLOP and memory figures of the compiled step, and
`jax.profiler` traces.

Model FLOPs (the convention of "model FLOPs utilisation"): 2 x the
multiply-adds of every matrix product and convolution, a trained module
counted 3 x its forward pass (forward, input gradient, weight gradient);
element-wise work (BatchNorm, activations, Adam) is not counted. The base
network (forward + backward over the batch) and the synthetic-gradient models
(and DNI's extra work) are separate numbers, so DNI's price is visible. The
compiled step's HLO FLOPs (`cost_analysis`) count what XLA actually runs,
element-wise work and any recomputation included.
"""

import contextlib
import functools
import glob
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dni_jax import feedforward
from dni_jax import recurrent

# ---------------------------------------------------------------------------
# Model FLOPs.
# ---------------------------------------------------------------------------

TRAIN = 3   # A trained module: forward + input gradient + weight gradient.
KERNEL = 5  # The CNNs' 5 x 5 convolutions (A.1).


def _mlp(sizes: list[int]) -> int:
  """Forward multiply-adds of one example through dense layers `sizes`."""
  return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def feedforward_flops(config: feedforward.FeedForwardConfig,
                      batch_size: int) -> dict[str, int]:
  """{'base': the network's forward + backward, 'synthetic': its
  synthetic-gradient (and synthetic-input) models, predicted and trained once
  per step} in FLOPs for one training step of `batch_size` examples."""
  n_hidden = config.num_layers - 1
  hid, classes = config.hidden_size, config.num_classes
  sg_layers, sg_size = config.resolved_sg_hidden_layers, config.sg_hidden_size
  context = classes if config.method == 'cdni' else 0
  n_sg = len(config.interfaces) if config.uses_synthetic_gradients else 0
  if config.model == 'fcn':
    d_in = math.prod(config.input_shape)
    base = _mlp([d_in] + [hid] * n_hidden + [classes])
    sg = n_sg * _mlp([hid + context] + [sg_size] * sg_layers + [hid])
    if config.synthetic_inputs:   # One I(x) per interface: x -> S -> h.
      sg += len(config.interfaces) * _mlp([d_in, sg_size, hid])
  else:
    h, w, c = config.input_shape
    base, sizes = 0, []   # sizes: spatial size after each hidden layer.
    for _ in range(n_hidden):
      base += h * w * KERNEL ** 2 * c * hid
      h, w, c = -(-h // 2), -(-w // 2), hid   # 3 x 3 pooling, stride 2.
      sizes.append(h * w)
    base += h * w * c * classes
    per_position = _mlp([hid + context] + [sg_size] * sg_layers + [hid])
    sg = sum(sizes[k - 1] * KERNEL ** 2 * per_position
             for k in config.interfaces) if n_sg else 0
  return {'base': 2 * TRAIN * batch_size * base,
          'synthetic': 2 * TRAIN * batch_size * sg}


def recurrent_flops(config: recurrent.RecurrentConfig,
                    batch_size: int) -> dict[str, int]:
  """{'base': the unroll's T steps forward + backward (core and readout),
  'synthetic': M (and A) and the replayed steps} in FLOPs for one step.

  DNI: M predicts delta_T once and is trained once (on the previous
  boundary, re-run from the K = 1 replayed step, forward only). DNI + Aux:
  M at every step instead (the aux targets; the last step's is delta_T),
  trained once, A trained at every step, and K = T replayed steps forward
  and backward (the aux loss trains the core)."""
  gates = 4 if config.core == 'lstm' else 1
  v_in, v_out, hid, t = (config.input_size, config.output_size,
                         config.hidden_size, config.unroll)
  core = (v_in + hid) * gates * hid          # One step's gate products.
  base = TRAIN * t * (core + hid * v_out)
  m = _mlp([hid, hid, config.sg_size])       # M and A: H -> H -> sg_size.
  sg = 0
  if config.method == 'dni':
    sg = m + TRAIN * m + core
  elif config.method == 'dni_aux':
    sg = TRAIN * m + t * m + TRAIN * t * m + TRAIN * t * core
  return {'base': 2 * batch_size * base, 'synthetic': 2 * batch_size * sg}


# ---------------------------------------------------------------------------
# Peaks.
# ---------------------------------------------------------------------------

# Dense (no sparsity) datasheet peaks in TFLOP/s, matched against
# `device.device_kind` in this order. 'float32' is the TF32 tensor-core peak
# where the GPU has one: at JAX's default matmul precision float32 matrix
# products run as TF32 there; 'float32_cores' is the plain FP32 peak. TPUs
# publish bfloat16 only. Sources: NVIDIA H200, H100, A100 and L4 datasheets
# (their tensor figures are "with sparsity": halved here); Google Cloud TPU
# documentation, system architecture pages (v4, v5e, v5p, v6e).
DATASHEET_PEAKS_TFLOPS = (
    ('H200', {'float32': 494.7, 'float32_cores': 67.0, 'bfloat16': 989.4},
     'NVIDIA H200 datasheet (SXM)'),
    ('H100 PCIe', {'float32': 378.0, 'float32_cores': 51.0,
                   'bfloat16': 756.0}, 'NVIDIA H100 datasheet (PCIe)'),
    ('H100', {'float32': 494.7, 'float32_cores': 67.0, 'bfloat16': 989.4},
     'NVIDIA H100 datasheet (SXM)'),
    ('A100', {'float32': 156.0, 'float32_cores': 19.5, 'bfloat16': 312.0},
     'NVIDIA A100 datasheet'),
    ('L4', {'float32': 60.0, 'float32_cores': 30.3, 'bfloat16': 121.0},
     'NVIDIA L4 datasheet'),
    ('TPU v6 lite', {'bfloat16': 918.0}, 'Google Cloud TPU v6e documentation'),
    ('TPU v5 lite', {'bfloat16': 197.0}, 'Google Cloud TPU v5e documentation'),
    ('TPU v5', {'bfloat16': 459.0}, 'Google Cloud TPU v5p documentation'),
    ('TPU v4', {'bfloat16': 275.0}, 'Google Cloud TPU v4 documentation'),
)


def datasheet_peak(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(FLOP/s, source) of `device_kind` for matmuls in `dtype`; (None, why)
  for a device or dtype not in the table."""
  for key, peaks, source in DATASHEET_PEAKS_TFLOPS:
    if key.lower() in device_kind.lower():
      if dtype in peaks:
        return 1e12 * peaks[dtype], f'{source}, {dtype}'
      return None, f'{source} gives no {dtype} peak'
  return None, f'no datasheet peak known for {device_kind!r}'


MATMUL_SIZES = (512, 1024, 2048)


def measured_matmul_peak(dtype: str = 'float32',
                         sizes: tuple[int, ...] = MATMUL_SIZES,
                         calls: int = 10) -> float:
  """The best FLOP/s of a jitted [n, n] x [n, n] matmul in `dtype` on the
  default device over the sizes n and `calls` calls each (after 2 warm-up
  calls): the best, not the median, since on a shared host a long call is
  more likely to be preempted than a short one; several sizes, since the
  largest may not fit in cache (on this project's CPU 512 runs ~4x the
  FLOP/s of 2048)."""
  from dni_jax.benchmarking import time_call   # It imports this module.
  matmul = jax.jit(lambda x, y: x @ y)
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    time_call(matmul, (a, a), 2, 1)
    seconds = min(time_call(matmul, (a, a), 0, 1) for _ in range(calls))
    best = max(best, 2.0 * n ** 3 / seconds)
  return best


def peak_for(dtype: str, sizes: tuple[int, ...] = MATMUL_SIZES
             ) -> tuple[float | None, str]:
  """(FLOP/s, source): the peak a row in `dtype` is compared with: on CPU
  the matmul measured now (`measured_matmul_peak`), else the datasheet."""
  if jax.default_backend() == 'cpu':
    return (measured_matmul_peak(dtype, sizes),
            f'measured: best {dtype} n x n matmul, n in '
            f'{"/".join(map(str, sizes))}, best of 10 calls, this run')
  return datasheet_peak(jax.devices()[0].device_kind, dtype)


# ---------------------------------------------------------------------------
# The compiled step: HLO FLOPs and memory; the profiler.
# ---------------------------------------------------------------------------

def compiled_stats(jitted: Callable, *args) -> dict[str, float | None]:
  """{'hlo_flops': XLA's cost analysis, 'compiled_memory_bytes': the
  compiled program's peak (arguments, outputs and temporaries)} of one
  call; None where the backend does not say."""
  try:
    compiled = jitted.lower(*args).compile()
  except Exception:  # Not a jitted function (e.g. a per-layer schedule).
    return {'hlo_flops': None, 'compiled_memory_bytes': None}
  flops = memory = None
  try:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else None
    if analysis and 'flops' in analysis:
      flops = float(analysis['flops'])
  except Exception:  # Some backends do not implement it: reported as None.
    flops = None
  try:
    m = compiled.memory_analysis()
    memory = getattr(m, 'peak_memory_in_bytes', None) or (
        m.argument_size_in_bytes + m.output_size_in_bytes
        + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # No memory analysis on this backend: reported as None.
    memory = None
  return {'hlo_flops': flops, 'compiled_memory_bytes': memory}


@contextlib.contextmanager
def unrolled_scans():
  """`jax.lax.scan` fully unrolled while a function traces: XLA's cost
  analysis counts a while loop's body once, whatever its trip count (a T-step
  `recurrent.unroll` would count as one step)."""
  scan = jax.lax.scan
  jax.lax.scan = functools.partial(scan, unroll=True)
  try:
    yield
  finally:
    jax.lax.scan = scan


def scan_unrolled_flops(fn: Callable, *args) -> float | None:
  """XLA's FLOPs of one call of `fn` (a pure, un-jitted function), traced
  afresh with every `lax.scan` unrolled, so loop bodies count once per
  iteration."""
  with unrolled_scans():
    return compiled_stats(jax.jit(fn), *args)['hlo_flops']


def device_peak_memory_bytes() -> int | None:
  """Peak bytes in use on the default device so far in this process (None
  where the backend does not say, e.g. CPU)."""
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats:
    return None
  return stats.get('peak_bytes_in_use', stats.get('bytes_in_use'))


def profile_steps(step: Callable, state: Any, args: tuple, num_steps: int,
                  logdir: str) -> tuple[list[str], Any]:
  """Runs `state, _ = step(state, *args)` `num_steps` times (compiled
  before) under `jax.profiler.trace(logdir)`; returns (the trace files
  written, the final state)."""
  state, _ = step(state, *args)   # Compile outside the trace.
  jax.block_until_ready(state)
  with jax.profiler.trace(logdir):
    for _ in range(num_steps):
      state, _ = step(state, *args)
    jax.block_until_ready(state)
  files = glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*'))
  return sorted(files), state


def rate_fields(seconds: float, examples: int, flops: dict, hlo_flops,
                peak: float | None) -> dict:
  """A row's throughput and FLOP columns from its median step time."""
  model = flops['base'] + flops['synthetic']
  per_s = lambda f: f / seconds if f else None
  util = lambda f: f / seconds / peak if (f and peak) else None
  return {'steps_per_s': 1.0 / seconds, 'examples_per_s': examples / seconds,
          'hlo_flops_per_step': hlo_flops,
          'model_flops_per_step': flops['base'],
          'sg_model_flops_per_step': flops['synthetic'],
          'hlo_flops_per_s': per_s(hlo_flops),
          'model_flops_per_s': per_s(model),
          'hlo_utilisation': util(hlo_flops), 'model_utilisation': util(model)}

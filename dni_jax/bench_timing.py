"""Timing and reporting every benchmark shares: median wall time of a step
(each followed by `jax.block_until_ready`, the same on CPU, GPU and TPU),
the host's load, the devices, markdown tables. Re-exported by
`dni_jax.benchmarking`."""

import os
import statistics
import time
from typing import Any, Callable

import jax


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



def time_dispatch(step: Callable, state: Any, args: tuple, steps: int
                  ) -> tuple[float, Any]:
  """Median seconds the host spends in `state, _ = step(state, *args)` until
  the call returns (dispatch: argument checks, transfers, launching the
  program; the computation itself runs on asynchronously), each call then
  waited for. Returns (seconds, final state)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = step(state, *args)
    times.append(time.perf_counter() - start)
    jax.block_until_ready(state)
  return statistics.median(times), state

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

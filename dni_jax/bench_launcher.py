"""The pinned-process launcher of the pipeline suite (CPU hosts): one
process per device pinned to its own core, JAX's multi-process runtime with
gloo collectives over 127.0.0.1, so every stage has compute of its own. The
worker is `python -m dni_jax.benchmarking SPEC OUT ...` (`worker_main`).
Re-exported by `dni_jax.benchmarking`."""

import json
import os
import socket
import subprocess
import sys
import time

import jax

from dni_jax.bench_pipeline import run_baseline
from dni_jax.bench_pipeline import run_check
from dni_jax.bench_pipeline import run_pipelines

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

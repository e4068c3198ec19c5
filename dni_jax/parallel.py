"""Data parallelism over a device mesh, and multi-host setup.

The batch is split along a 1-D mesh axis ('data'); every module's state is
replicated (a recurrent network's carried state, one row per stream, is
split with the batch: `make_data_parallel_recurrent`). `make_data_parallel` jits the feed-forward functions of
`dni_jax.feedforward` (the same functions, nothing re-implemented) with
`NamedSharding`s, so each call is the *global* computation -- BatchNorm batch
statistics and batch-mean losses over the whole global batch, exactly as on
one device -- and XLA inserts the collectives. Both the fused `train_step`
and the per-module functions that `per_layer_train_step` schedules run
sharded.

`make_per_device_step` is the same fused step (`feedforward.train_step`, its
modules built with `axis_name`) run on one device's shard of the batch, for
`jax.pmap(..., axis_name=...)` or `jax.shard_map(..., check_vma=False)`
(`make_shard_map_step`): gradients are averaged over the axis before every
module's optimiser update (`lax.pmean`) and BatchNorm averages its
statistics over it, which again gives the one-device result on the global
batch.

Multi-host: `initialize_distributed` starts `jax.distributed`; the mesh of
`make_data_mesh` then spans every process's devices, and `shard_batch` builds
a global array from the global batch that every process holds on its host
(each process transfers only the rows its own devices hold).
"""

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from dni_jax import feedforward
from dni_jax import recurrent

DATA_AXIS = 'data'


# ---------------------------------------------------------------------------
# Multi-host.
# ---------------------------------------------------------------------------

def validate_distributed(coordinator_address: str | None,
                         num_processes: int | None,
                         process_id: int | None) -> None:
  """Raises ValueError (naming the flag) on inconsistent distributed settings."""
  if coordinator_address is None:
    if num_processes is not None or process_id is not None:
      raise ValueError('--num_processes/--process_id need '
                       '--coordinator_address (host:port of process 0, or '
                       '"auto" where JAX detects the cluster)')
    return
  if coordinator_address != 'auto' and not re.fullmatch(
      r'[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+', coordinator_address):
    raise ValueError(f'--coordinator_address={coordinator_address}: must be '
                     'host:port (for example 127.0.0.1:12345) or "auto"')
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes}: must be >= 1')
  if process_id is not None:
    if process_id < 0:
      raise ValueError(f'--process_id={process_id}: must be >= 0')
    if num_processes is not None and process_id >= num_processes:
      raise ValueError(f'--process_id={process_id}: must be less than '
                       f'--num_processes={num_processes}')


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts `jax.distributed` for a multi-process run; returns whether it did.

  Nothing happens when `coordinator_address` is None (one process).
  `coordinator_address='auto'` lets JAX detect everything from the cluster
  environment (Cloud TPU, SLURM, Open MPI, ...); otherwise `num_processes`
  and `process_id` left as None are detected the same way. Must run before
  anything touches a JAX device. CPU processes exchange data with gloo.
  """
  validate_distributed(coordinator_address, num_processes, process_id)
  if coordinator_address is None:
    return False
  # Cross-process collectives of CPU devices; ignored by GPU and TPU backends.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address == 'auto':
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  return True


# ---------------------------------------------------------------------------
# Meshes and placement.
# ---------------------------------------------------------------------------

def make_data_mesh(num_devices: int | None = None,
                   axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over `num_devices` devices of *every* process (None: all).

  With several processes each contributes its first `num_devices` local
  devices, so the mesh has `num_devices * process_count()` devices.
  """
  local = jax.local_device_count()
  if num_devices is None:
    num_devices = local
  if not 1 <= num_devices <= local:
    raise ValueError(f'--num_devices={num_devices}: must be in 1..{local} '
                     f'(this process has {local} {jax.default_backend()} '
                     'devices)')
  by_process = {}
  for device in jax.devices():
    by_process.setdefault(device.process_index, []).append(device)
  devices = [d for p in sorted(by_process)
             for d in sorted(by_process[p], key=lambda d: d.id)[:num_devices]]
  return jax.make_mesh((len(devices),), (axis_name,),
                       axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the mesh's only axis."""
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
  if batch_size % mesh.size:
    raise ValueError(f'--batch_size={batch_size}: must be divisible by the '
                     f'{mesh.size} devices of the data-parallel mesh '
                     '(--num_devices times the number of processes)')


def global_array(host_array, sharding: NamedSharding) -> jax.Array:
  """A host value as a global array with `sharding`; works with several
  processes, each holding the same value."""
  host_array = np.asarray(host_array)
  # Each process copies only the slices its own devices hold.
  return jax.make_array_from_callback(host_array.shape, sharding,
                                      lambda index: host_array[index])


def shard_batch(mesh: Mesh, *host_arrays):
  """Global arrays split along their leading dimension over `mesh`.

  Every process passes the same global batch (host numpy arrays); the
  leading dimension must be divisible by the mesh size.
  """
  sharding = batch_sharded(mesh)
  for a in host_arrays:
    check_batch_size(mesh, np.shape(a)[0])
  out = tuple(global_array(a, sharding) for a in host_arrays)
  return out if len(out) != 1 else out[0]


def place_batch(mesh: Mesh, *host_arrays):
  """`shard_batch` where the leading dimension divides over the mesh,
  otherwise `replicate` (for example a last, smaller evaluation batch)."""
  if all(np.shape(a)[0] % mesh.size == 0 for a in host_arrays):
    return shard_batch(mesh, *host_arrays)
  out = tuple(replicate(mesh, np.asarray(a)) for a in host_arrays)
  return out if len(out) != 1 else out[0]


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Every leaf copied to every device of `mesh` (host or device leaves;
  every process must pass the same values)."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: global_array(jax.device_get(x), sharding), tree)


# ---------------------------------------------------------------------------
# Data parallelism with jit + NamedSharding.
# ---------------------------------------------------------------------------

def make_data_parallel(config: feedforward.FeedForwardConfig, mesh: Mesh,
                       donate: bool | None = None) -> feedforward.FeedForward:
  """`make_feedforward(config)` with every function jitted over `mesh`.

  States are replicated; images, labels, activations, gradients and contexts
  are split along the batch over the mesh's axis. Inputs without a sharding
  (numpy, uncommitted arrays) are placed accordingly; arrays already placed
  elsewhere are refused by jit. Returns the same `FeedForward` NamedTuple, so
  `ff.train_step` and `feedforward.per_layer_train_step(ff, ...)` run
  data-parallel unchanged. `eval_batch`, `predict` and `diagnostics` take
  their inputs' shardings as they come (batch-split or replicated) and return
  replicated sums / metrics (`predict`: as the compiler places them).
  """
  if len(mesh.axis_names) != 1:
    raise ValueError(f'make_data_parallel needs a 1-D mesh, got axes '
                     f'{mesh.axis_names}')
  if config.axis_name is not None:
    raise ValueError('make_data_parallel partitions the global computation '
                     'itself: use a config with axis_name=None (axis_name is '
                     'for make_per_device_step under pmap / shard_map)')
  base = feedforward.make_feedforward(config, donate=donate)
  raw = feedforward.make_feedforward(config, jit=False)
  if donate is None:
    donate = jax.default_backend() != 'cpu'
  R, B = replicated(mesh), batch_sharded(mesh)
  layers = {'static_argnums': (0,)}
  # name: (jit options, in_shardings (None: follow the inputs), out_shardings)
  table = {
      'init': ({}, None, R),
      'train_step': ({'donate_argnums': (0,) if donate else ()},
                     (R, B, B), (R, R)),
      'eval_batch': ({}, None, R),
      'diagnostics': ({}, None, R),
      'hidden_update': (layers, (R, R, B, B), (R, B, B, B)),
      'block_update': (layers, (R, R, B, B), (R, B, B, B)),
      'head_update': ({}, (R, B, B), (R, B, R, B)),
      'top_block_update': (layers, (R, R, B, B), (R, R, B, B, R, B)),
      'synthetic_update': ({}, (R, B, B, B), (R, R)),
      'synthetic_gradient': ({}, (R, B, B), B),
      'synthetic_input': ({}, (R, B), B),
      'synthetic_input_update': ({}, (R, B, B), (R, R)),
      'backprop_update': (layers, (R, B, B), (R, B, B, B)),
      'hidden_forward': ({'static_argnums': (0, 3)}, (R, B), B),
      'context': ({}, B, B),
  }
  sharded = {}
  for name, (options, in_shardings, out_shardings) in table.items():
    if in_shardings is not None:
      options = dict(options, in_shardings=in_shardings)
    sharded[name] = jax.jit(getattr(raw, name), out_shardings=out_shardings,
                            **options)
  # Functions not in the table (and `predict`) follow their inputs' shardings.
  return base._replace(**sharded)


def make_data_parallel_recurrent(config: recurrent.RecurrentConfig,
                                 mesh: Mesh) -> recurrent.Recurrent:
  """`recurrent.make_recurrent(config)` with its functions jitted over `mesh`.

  The B streams are split over the mesh's axis: chunks, the carried core
  state and the replay buffers (one row per stream) are batch-sharded;
  parameters, optimiser state and counters are replicated. Each call is the
  global computation (losses are means over all streams), so results equal
  one device's within float summation order. The batch size and an
  evaluation's number of streams must divide over the mesh. Returns the same
  `Recurrent` NamedTuple; `train_step` donates its state, as on one device.
  """
  if len(mesh.axis_names) != 1:
    raise ValueError(f'make_data_parallel_recurrent needs a 1-D mesh, got '
                     f'axes {mesh.axis_names}')
  recurrent.validate_config(config)
  R, B = replicated(mesh), batch_sharded(mesh)
  # Sharding prefixes: B covers every per-stream leaf (absent replay fields
  # of truncated BPTT are empty subtrees).
  state = recurrent.RecurrentState(
      params=R, opt_state=R, step=R,
      carry=recurrent.Carry(core=B, replay_start=B, replay_inputs=B,
                            replay_resets=B, valid=R))
  chunk = recurrent.Chunk(B, B, B, B)
  init = jax.jit(functools.partial(recurrent.init_state, config),
                 static_argnums=1, out_shardings=state)
  return recurrent.Recurrent(
      config=config,
      init=lambda key, batch_size, example_inputs: init(
          key, batch_size, jnp.asarray(example_inputs)),
      train_step=jax.jit(functools.partial(recurrent.train_step, config),
                         in_shardings=(state, chunk), out_shardings=(state, R),
                         donate_argnums=0),
      evaluate_chunk=jax.jit(functools.partial(recurrent.evaluate_chunk,
                                               config),
                             in_shardings=(R, B, chunk),
                             out_shardings=(B, R)))


# ---------------------------------------------------------------------------
# The per-device step, for pmap / shard_map.
# ---------------------------------------------------------------------------

def _all_devices(flags, axis_name):
  """True where every device's flag is True."""
  return jax.lax.pmin(flags.astype(jnp.int32), axis_name).astype(jnp.bool_)


def reduce_metrics(metrics: dict, axis_name: str) -> dict:
  """One device's `schedule` metrics -> the global batch's: batch means
  (loss, accuracy, synthetic-gradient / -input losses) averaged over the
  axis (equal shards), health flags True only where every device's is."""
  out = {}
  for name, value in metrics.items():
    if name.endswith('_finite'):
      out[name] = _all_devices(value, axis_name)
    elif name == 'block_updated':
      out[name] = value  # Drawn from (seed, step): the same on every device.
    else:
      out[name] = jax.lax.pmean(value, axis_name)
  return out


def make_per_device_step(config: feedforward.FeedForwardConfig,
                         axis_name: str = DATA_AXIS) -> Callable:
  """The fused training step of one device's shard of the batch (unjitted).

  `step(state, images_shard, labels_shard) -> (state, metrics)` must run
  inside `jax.pmap(step, axis_name=axis_name)`, or `jax.shard_map` over
  `axis_name` with `check_vma=False` (`make_shard_map_step`): every module's
  gradients are averaged over the axis with an explicit `lax.pmean` before
  its Adam update and BatchNorm normalises with statistics over the axis, so
  with equal shards the result is the one-device step on the global batch.
  (With `check_vma=True`, shard_map's autodiff already sums the gradients of
  the replicated parameters over the axis, and the mean would be taken
  twice.) The state is the one `init` of `make_feedforward(config)` gives.
  """
  if config.method == 'stale':
    raise ValueError('method=stale keeps one gradient per slot of the global '
                     'batch; a per-device step sees only its shard: use '
                     'make_data_parallel')
  config = dataclasses.replace(config, axis_name=axis_name)
  modules = feedforward.build_modules(config)

  def step(state, images, labels):
    state, metrics = feedforward.train_step(modules, state, images, labels)
    return state, reduce_metrics(metrics, axis_name)
  return step


def make_shard_map_step(config: feedforward.FeedForwardConfig,
                        mesh: Mesh) -> Callable:
  """`make_per_device_step` under `jax.jit(jax.shard_map(...))` over a 1-D
  mesh: state replicated, images and labels split along the batch; returns
  (state, metrics), replicated."""
  axis = mesh.axis_names[0]
  return jax.jit(jax.shard_map(
      make_per_device_step(config, axis), mesh=mesh,
      in_specs=(P(), P(axis), P(axis)), out_specs=(P(), P()),
      check_vma=False))


def one_call_at_a_time(ff: feedforward.FeedForward) -> feedforward.FeedForward:
  """`ff` whose functions return only once their results are computed.

  For data parallelism over CPU devices of one process (fake devices): there,
  two independent sharded calls in flight at once (the per-layer schedule
  dispatches several) may start in a different order on different devices
  and wait for each other in XLA:CPU's in-process collectives ("Expected 2
  threads to join the rendezvous"; seen once on 2 cores under load).
  Accelerators order each device's work in its own stream and need no such
  wrapper; the fused `train_step` is a single call.
  """
  def blocking(f):
    return lambda *args, **kwargs: jax.block_until_ready(f(*args, **kwargs))
  return ff._replace(**{name: blocking(getattr(ff, name))
                        for name in ff._fields
                        if name not in ('config', 'modules')})

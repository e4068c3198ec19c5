"""Data parallelism on fake CPU devices: every sharded path equals one device."""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from dni_jax import experiments
from dni_jax import feedforward
from dni_jax import parallel
from dni_jax import recurrent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FF = os.path.join(REPO, 'scripts', 'train_ff.py')
# Sharded sums run in another order than one device's: float rounding only.
TOL = dict(atol=2e-6, rtol=2e-5)
BATCH = 8


def tiny_config(**kw):
  args = dict(input_shape=(4, 4, 1), num_layers=3, hidden_size=16,
              method='cdni', sg_hidden_layers=1, sg_hidden_size=16,
              learning_rate=1e-2)
  args.update(kw)
  return feedforward.FeedForwardConfig(**args)


def batches(config, num, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num, BATCH) + config.input_shape)
  labels = rng.integers(0, config.num_classes, (num, BATCH))
  return images.astype(np.float32), labels.astype(np.int32)


def warm_state(ff, images, labels, warm):
  """`warm` one-device steps from init. The first synthetic-gradient update
  regresses a zero prediction onto targets whose batch mean is zero in exact
  arithmetic (BatchNorm below); Adam turns that rounding noise into +-lr steps
  whose signs depend on the order of the sums, so sharded and one-device runs
  are compared from after it (see docs/PARALLEL_NOTES.md)."""
  state = ff.init(jax.random.key(0))
  for t in range(warm):
    state, _ = ff.train_step(state, images[t], labels[t])
  return state


@functools.lru_cache(maxsize=None)
def reference(case):
  """(config, images, labels, start state, state and metrics after 3
  one-device steps) of a case, computed once per test session."""
  overrides, warm = CASES[case]
  config = tiny_config(**overrides)
  images, labels = batches(config, warm + 3)
  ff = feedforward.make_feedforward(config)
  start = warm_state(ff, images, labels, warm)
  state = start
  for t in range(warm, warm + 3):
    state, metrics = ff.train_step(state, images[t], labels[t])
  return config, images[warm:], labels[warm:], start, state, metrics


def assert_replicated(tree, mesh):
  for leaf in jax.tree.leaves(tree):
    assert leaf.sharding.is_fully_replicated, leaf.sharding
    assert leaf.sharding.mesh == mesh


# name: (config overrides, one-device warm-up steps)
CASES = {
    'cdni_every_layer': (dict(), 2),
    'dni_cnn': (dict(method='dni', model='cnn', num_layers=2,
                     input_shape=(8, 8, 1), hidden_size=4,
                     sg_hidden_size=4), 0),
    'complete_unlock_sparse': (dict(method='dni', dni_layers=(2,),
                                    synthetic_inputs=True, p_update=0.5), 0),
}


@pytest.mark.slow
@pytest.mark.parametrize('case, num_devices', [
    ('cdni_every_layer', 2), ('dni_cnn', 4), ('complete_unlock_sparse', 4)])
def test_fused_step_sharded_equals_one_device(case, num_devices):
  config, images, labels, start, expected, expected_metrics = reference(case)
  mesh = parallel.make_data_mesh(num_devices)
  dp = parallel.make_data_parallel(config, mesh)
  state = parallel.replicate(mesh, start)
  for x, y in zip(images, labels):
    x, y = parallel.shard_batch(mesh, x, y)
    assert x.sharding.spec == P('data')
    state, metrics = dp.train_step(state, x, y)
  assert_replicated((state, metrics), mesh)
  chex.assert_trees_all_close(state, expected, **TOL)
  chex.assert_trees_all_close(metrics, expected_metrics, **TOL)


def test_per_layer_functions_sharded_equal_one_device():
  # cDNI after every layer: one jitted call per block and interface.
  config, images, labels, start, expected, expected_metrics = reference(
      'cdni_every_layer')
  mesh = parallel.make_data_mesh(4)
  # One call at a time: fake CPU devices can deadlock on independent calls
  # with collectives in flight at once.
  dp = parallel.one_call_at_a_time(parallel.make_data_parallel(config, mesh))
  state = parallel.replicate(mesh, start)
  for x, y in zip(images, labels):
    state, metrics = feedforward.per_layer_train_step(
        dp, state, *parallel.shard_batch(mesh, x, y))
  assert_replicated(state, mesh)
  chex.assert_trees_all_close(state, expected, **TOL)
  chex.assert_trees_all_close(metrics, expected_metrics, **TOL)


def test_per_module_outputs_stay_split_over_the_batch():
  config, images, labels, start, _, _ = reference('cdni_every_layer')
  mesh = parallel.make_data_mesh(2)
  dp = parallel.one_call_at_a_time(parallel.make_data_parallel(config, mesh))
  # numpy inputs are placed by the jitted functions themselves.
  ctx = dp.context(labels[0])
  layer, h, grad_x, grad_h = dp.hidden_update(
      0, start.layers[0], start.synthetic[0], images[0], ctx)
  assert_replicated(layer, mesh)
  for a in (ctx, h, grad_x, grad_h):
    assert a.sharding.spec == P('data') and a.shape[0] == BATCH
  # Evaluation follows its inputs: split, or replicated (an odd batch).
  state = parallel.replicate(mesh, start)
  odd = parallel.place_batch(mesh, images[0][:5], labels[0][:5])
  assert odd[0].sharding.is_fully_replicated
  split_sums = dp.eval_batch(state, *parallel.place_batch(mesh, images[0],
                                                          labels[0]))
  odd_sums = dp.eval_batch(state, *odd)
  ff = feedforward.make_feedforward(config)
  chex.assert_trees_all_close(
      (split_sums, odd_sums),
      (ff.eval_batch(start, images[0], labels[0]),
       ff.eval_batch(start, images[0][:5], labels[0][:5])), **TOL)


def split(x, n):
  return x.reshape((n, -1) + x.shape[1:])


def test_pmap_per_device_step_equals_one_device():
  config, images, labels, start, expected, expected_metrics = reference(
      'cdni_every_layer')
  step = jax.pmap(parallel.make_per_device_step(config, 'data'),
                  axis_name='data', devices=jax.devices()[:2])
  state = jax.tree.map(lambda a: jnp.stack([a, a]), start)
  for x, y in zip(images, labels):
    state, metrics = step(state, split(x, 2), split(y, 2))
  for d in range(2):  # Every device holds the one-device result.
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[d], state),
                                expected, **TOL)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[d], metrics),
                                expected_metrics, **TOL)


def test_shard_map_per_device_step_equals_one_device():
  config, images, labels, start, expected, expected_metrics = reference(
      'cdni_every_layer')
  mesh = parallel.make_data_mesh(4)
  step = parallel.make_shard_map_step(config, mesh)
  state = parallel.replicate(mesh, start)
  for x, y in zip(images, labels):
    state, metrics = step(state, *parallel.shard_batch(mesh, x, y))
  chex.assert_trees_all_close(state, expected, **TOL)
  chex.assert_trees_all_close(metrics, expected_metrics, **TOL)

  # What the axis plumbing buys: the plain step on each shard alone
  # (BatchNorm over the shard, no gradient mean) is not the global step.
  modules = feedforward.build_modules(config)
  local = jax.jit(jax.shard_map(
      lambda s, x, y: feedforward.train_step(modules, s, x, y)[0], mesh=mesh,
      in_specs=(P(), P('data'), P('data')), out_specs=P(), check_vma=False))
  state = parallel.replicate(mesh, start)
  for x, y in zip(images, labels):
    state = local(state, *parallel.shard_batch(mesh, x, y))
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(state.layers), jax.tree.leaves(expected.layers)))
  assert diff > 1e-3


@pytest.mark.parametrize('method', ['bptt', 'dni', 'dni_aux'])
def test_recurrent_sharded_over_streams_equals_one_device(method):
  """The LSTM's streams split over 4 devices: carried state and replay
  buffers stay split, and 4 steps (state carried across them) and an
  evaluation equal one device's."""
  config = recurrent.RecurrentConfig(
      core='lstm', input_size=5, output_size=5, hidden_size=8, unroll=3,
      method=method, learning_rate=1e-2)
  rng = np.random.default_rng(0)
  shape = (BATCH, config.unroll)
  chunks = [recurrent.Chunk(
      rng.integers(0, 5, shape).astype(np.int32),
      rng.integers(0, 5, shape).astype(np.int32),
      np.ones(shape, np.float32),
      (rng.random(shape) < 0.2).astype(np.float32)) for _ in range(4)]
  one = recurrent.make_recurrent(config)
  mesh = parallel.make_data_mesh(4)
  par = parallel.make_data_parallel_recurrent(config, mesh)
  expected = one.init(jax.random.key(0), BATCH, chunks[0].inputs)
  state = par.init(jax.random.key(0), BATCH, chunks[0].inputs)
  assert state.carry.core[0].sharding.spec == P('data')
  for chunk in chunks:
    expected, expected_metrics = one.train_step(expected, chunk)
    state, metrics = par.train_step(state, chunk)
  assert state.carry.core[0].sharding.spec == P('data')
  chex.assert_trees_all_close(jax.device_get(state), jax.device_get(expected),
                              **TOL)
  chex.assert_trees_all_close(metrics, expected_metrics, **TOL)
  state0 = recurrent.zero_state(config, BATCH)
  chex.assert_trees_all_close(
      par.evaluate_chunk(state.params, state0, chunks[0]),
      one.evaluate_chunk(expected.params, state0, chunks[0]), **TOL)


def test_default_axis_name_leaves_the_modules_unchanged():
  config = tiny_config()
  modules = feedforward.build_modules(config)
  assert all(m.axis_name is None for m in modules.hidden)
  assert modules.synthetic.axis_name is None
  mapped = feedforward.build_modules(tiny_config(axis_name='data'))
  assert all(m.axis_name == 'data' for m in mapped.hidden)
  assert mapped.synthetic.axis_name == 'data'


def test_bad_settings_are_clear_errors():
  with pytest.raises(ValueError, match=r'--num_devices=5: must be in 1\.\.4'):
    parallel.make_data_mesh(5)
  with pytest.raises(ValueError, match=r'--num_devices=0'):
    parallel.make_data_mesh(0)
  mesh = parallel.make_data_mesh(4)
  with pytest.raises(ValueError, match=r'--batch_size=6: must be divisible by '
                     r'the 4 devices'):
    parallel.shard_batch(mesh, np.zeros((6, 2), np.float32))
  with pytest.raises(ValueError, match='1-D mesh'):
    parallel.make_data_parallel(tiny_config(), jax.make_mesh(
        (2, 2), ('a', 'b'), axis_types=(jax.sharding.AxisType.Auto,) * 2))
  with pytest.raises(ValueError, match='axis_name=None'):
    parallel.make_data_parallel(tiny_config(axis_name='data'), mesh)
  with pytest.raises(ValueError, match='method=stale'):
    parallel.make_per_device_step(tiny_config(method='stale', batch_size=8))
  for args, needle in [(('127.0.0.1:1', 2, 2), '--process_id=2: must be less'),
                       (('127.0.0.1', 2, 0), '--coordinator_address=127.0.0.1:'
                        ' must be host:port'),
                       ((None, 2, None), 'need --coordinator_address'),
                       (('auto', 0, None), '--num_processes=0')]:
    with pytest.raises(ValueError, match=needle):
      parallel.initialize_distributed(*args)
  assert not parallel.initialize_distributed()   # One process: nothing to do.


def run_train_ff(workdir, data_dir, *extra):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, TRAIN_FF, f'--workdir={workdir}', '--dataset=mnist',
       f'--data_dir={data_dir}', '--method=cdni', '--num_layers=3',
       '--dni_layers=2', '--hidden_size=32', '--sg_hidden_size=32',
       '--learning_rate=3e-3', '--lr_boundaries=', '--num_steps=10',
       '--eval_every=5', '--log_every=5', '--checkpoint_every=5', *extra],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


@pytest.mark.slow
def test_bad_parallel_flags_fail_before_the_workdir(tmp_path, mnist_dir):
  proc = run_train_ff(tmp_path / 'bad', mnist_dir, '--num_devices=3')
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last == ('train_ff.py: error: --num_devices=3: must be in 1..2 (this '
                  'process has 2 cpu devices)')
  # The same checks in process (4 fake devices).
  for kw, needle in [
      (dict(num_devices=5), r'--num_devices=5: must be in 1\.\.4'),
      (dict(num_devices=4, batch_size=34),
       '--batch_size=34: must be divisible by the 4 devices'),
      (dict(process_id=1), 'need --coordinator_address')]:
    with pytest.raises(ValueError, match=needle):
      experiments.train_feedforward(experiments.FeedForwardExperiment(
          workdir=str(tmp_path / 'bad'), data_dir=mnist_dir, **kw))
  assert not (tmp_path / 'bad').exists()


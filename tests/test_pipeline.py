"""The decoupled pipeline and the backprop pipeline: filling, staging, scans,
resuming and settings (their equations: tests/test_oracle_pipeline.py).

Fake CPU devices (conftest: 4) stand in for the stage devices.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dni_jax
from dni_jax import benchmarking
from dni_jax import experiments
from dni_jax import feedforward as ff_lib
from dni_jax import pipeline as pl

B = 16


def dni_config(dni_layers=(1, 2), method='cdni', model='fcn', **kw):
  args = dict(input_shape=(4, 4, 1), num_classes=10, num_layers=4,
              hidden_size=8, method=method, model=model,
              sg_hidden_layers=1 if method == 'dni' else 0, sg_hidden_size=16,
              learning_rate=1e-2, lr_boundaries=(), dni_layers=dni_layers)
  if model == 'cnn':
    args.update(input_shape=(8, 8, 1), hidden_size=4)
  args.update(kw)
  return dni_jax.FeedForwardConfig(**args)


def batch(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  shape = (B, 4, 4, 1)
  return jax.random.uniform(k1, shape), jax.random.randint(k2, (B,), 0, 10)


@functools.lru_cache(maxsize=None)
def make(config, num_stages):
  return pl.make_pipeline(config, pl.stage_mesh(num_stages), B)


def test_cnn_stages_send_their_activations_and_labels_up():
  """CNN activations [H, W, C] cross stages flattened: what stage 1 reads
  after a tick is stage 0's layer applied (Flax, training mode) to that
  tick's images with the weights it held before the tick."""
  config = dni_config((1,), 'dni', 'cnn')
  pipe = make(config, 2)
  state = pipe.init(jax.random.key(0))
  for seed in range(3):
    images = jax.random.uniform(jax.random.key(seed), (B, 8, 8, 1))
    labels = batch(seed)[1]
    before = pipe.to_feedforward(state).layers[0]
    state, metrics = pipe.tick(state, images, labels)
    h, _ = pipe.modules.hidden[0].apply(
        {'params': before.params, 'batch_stats': before.batch_stats}, images,
        train=True, mutable=['batch_stats'])
    assert pipe.layout.input_shapes[1] == h.shape[1:] and h.ndim == 4
    np.testing.assert_allclose(
        state.inputs[1][:, :h[0].size].reshape(h.shape), h, rtol=1e-5,
        atol=1e-6)
    np.testing.assert_array_equal(state.input_labels[1], labels)
  np.testing.assert_array_equal(metrics['block_updated'], [True, True])
  assert all(bool(np.all(metrics[k])) for k in (
      'activation_finite', 'layer_finite', 'synthetic_gradient_finite'))


def test_ticks_equal_as_many_single_ticks():
  """K ticks in one call (a lax.scan) compute what K calls of `tick` do,
  from an empty pipeline through the fill."""
  config = dni_config()
  pipe = make(config, 3)
  K = 4
  batches = [batch(seed) for seed in range(K)]
  state = pipe.init(jax.random.key(0))
  per_tick = []
  for images, labels in batches:
    state, metrics = pipe.tick(state, images, labels)
    per_tick.append(metrics)
  scanned, metrics = pipe.ticks(pipe.init(jax.random.key(0)),
                                jnp.stack([b[0] for b in batches]),
                                jnp.stack([b[1] for b in batches]))
  chex.assert_trees_all_close(scanned, state, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(
      metrics, jax.tree.map(lambda *m: jnp.stack(m), *per_tick),
      rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(metrics['block_updated'][0],
                                [True, False, False])


def test_pipeline_fills_stage_by_stage_and_starts_from_ff_init():
  config = dni_config()
  pipe = make(config, 3)
  state = pipe.init(jax.random.key(0))
  ff = dni_jax.make_feedforward(config)
  chex.assert_trees_all_equal(pipe.to_feedforward(state),
                              ff.init(jax.random.key(0)))
  start = pipe.to_feedforward(state)
  images, labels = batch(0)
  state, metrics = pipe.tick(state, images, labels)
  np.testing.assert_array_equal(metrics['block_updated'], [True, False, False])
  # Per stage; the top stage has no interface.
  np.testing.assert_array_equal(metrics['sg_updated'], [False, False, False])
  after = pipe.to_feedforward(state)
  # Only stage 0 (layer 1) ran (its synthetic gradient starts at zero, so
  # only its BatchNorm statistics move); the stages above had no input yet.
  assert not np.allclose(after.layers[0].batch_stats['BatchNorm_0']['mean'],
                         start.layers[0].batch_stats['BatchNorm_0']['mean'])
  chex.assert_trees_all_equal(after.layers[1:], start.layers[1:])
  chex.assert_trees_all_equal(after.head, start.head)
  chex.assert_trees_all_equal(after.synthetic, start.synthetic)
  assert float(metrics['loss']) == 0.0   # No batch has reached the top yet.
  state, metrics = pipe.tick(state, *batch(1))
  np.testing.assert_array_equal(metrics['block_updated'], [True, True, False])
  np.testing.assert_array_equal(metrics['sg_updated'], [True, False, False])
  np.testing.assert_array_equal(
      pl.interface_metrics(metrics)['sg_updated'], [True, False])
  state, metrics = pipe.tick(state, *batch(2))
  np.testing.assert_array_equal(metrics['block_updated'], [True, True, True])
  assert float(metrics['loss']) > 0



def _collectives(compiled_text: str) -> list[str]:
  return re.findall(r'\b(all-reduce|all-gather|collective-permute|all-to-all|'
                    r'reduce-scatter)(?:-start)?\(', compiled_text)


def test_a_two_stage_tick_is_one_collective():
  """With two stages a tick exchanges everything in one cyclic permute: no
  collective for the metrics (each one costs a rendezvous of the stages,
  milliseconds over gloo); with three, the messages up and down and one
  all-reduce of the top stage's loss and accuracy."""
  for stages, expected in ((2, ['collective-permute']),
                           (3, ['all-reduce'] + ['collective-permute'] * 2)):
    config = dni_config((1,) if stages == 2 else (1, 2))
    pipe = make(config, stages)
    state = pipe.init(jax.random.key(0))
    text = pipe.tick.lower(state, *batch(0)).compile().as_text()
    assert sorted(_collectives(text)) == expected, stages
    # The metrics the fused step reports, per interface, where they are read.
    _, metrics = pipe.tick(state, *batch(0))
    assert pl.interface_metrics(metrics)['sg_loss'].shape == (stages - 1,)

@pytest.mark.slow
def test_pipeline_learns_and_evaluates_like_the_network():
  config = dni_config(learning_rate=3e-2)
  pipe = make(config, 3)
  ff = dni_jax.make_feedforward(config)
  state = pipe.init(jax.random.key(1))
  images, labels = batch(7)
  images = images + jax.nn.one_hot(labels, 16).reshape(B, 4, 4, 1)
  losses = []
  for _ in range(60):
    state, metrics = pipe.tick(state, images, labels)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[2]
  chex.assert_trees_all_close(
      pipe.eval_batch(state, images, labels),
      ff.eval_batch(pipe.to_feedforward(state), images, labels))


def test_pipeline_rejects_what_it_does_not_implement():
  with pytest.raises(ValueError, match='method dni or cdni'):
    pl.make_pipeline(dni_config(None, 'bprop'), pl.stage_mesh(1), B)
  with pytest.raises(ValueError, match='blocks'):
    pl.make_pipeline(dni_config((1, 2)), pl.stage_mesh(2), B)
  with pytest.raises(ValueError, match='devices'):
    pl.stage_mesh(64)


def test_stage_placement_round_trip_keeps_dtypes_and_values():
  config = dni_config()
  state = dni_jax.make_feedforward(config).init(jax.random.key(0))
  placed = pl.place_stage(state.layers[1], 1, 3)
  for leaf, original in zip(jax.tree.leaves(placed),
                            jax.tree.leaves(state.layers[1])):
    assert leaf.shape == (3,) + original.shape and leaf.dtype == original.dtype
    assert not np.any(np.asarray(leaf[0])) and not np.any(np.asarray(leaf[2]))
  chex.assert_trees_all_equal(pl.stage_slice(placed, 1), state.layers[1])
  layout = pl.pipeline_layout(config, ff_lib.build_modules(config), B)
  # Distinct models (they start at zero), so that a swap would show.
  state = state._replace(synthetic=tuple(
      jax.tree.map(lambda x, i=i: x + i + 1, sg)
      for i, sg in enumerate(state.synthetic)))
  blocks, synthetic = pl.stack_stages(layout, state)
  chex.assert_trees_all_equal(
      pl.unstack_stages(layout, blocks, synthetic, state.step), state)


def test_balanced_interfaces_minimise_the_slowest_stage():
  assert pl.balanced_interfaces(4, 2, [10, 1, 1, 1]) == (1,)
  assert pl.balanced_interfaces(4, 2, [1, 1, 1, 10]) == (3,)
  assert pl.balanced_interfaces(4, 2, [1, 1, 1, 1], interface_cost=1) == (1,)
  assert pl.balanced_interfaces(4, 2, [1, 1, 1, 1]) == (2,)
  config = dni_config(None, num_layers=6, hidden_size=256,
                      input_shape=(28, 28, 1))
  costs, sg = pl.fcn_costs(config)
  assert costs == [2 * 784 * 256] + [3 * 256 * 256] * 4 + [3 * 2560]
  assert sg == 3 * 266 * 256   # cDNI, linear: [h, one-hot] -> h.
  assert pl.balanced_interfaces(6, 2, costs, sg) == (1,)
  with pytest.raises(ValueError, match='stages'):
    pl.balanced_interfaces(3, 4, [1, 1, 1])


def test_backprop_train_steps_equal_as_many_train_steps():
  config = dni_config(None, 'bprop')
  bp = pl.make_backprop_pipeline(config, pl.stage_mesh(2), B, (2,), 2)
  batches = [batch(seed) for seed in range(3)]
  state = bp.init(jax.random.key(0))
  losses = []
  for images, labels in batches:
    state, metrics = bp.train_step(state, images, labels)
    losses.append(metrics['loss'])
  scanned, metrics = bp.train_steps(bp.init(jax.random.key(0)),
                                    jnp.stack([b[0] for b in batches]),
                                    jnp.stack([b[1] for b in batches]))
  chex.assert_trees_all_close(scanned, state, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics['loss'], losses, rtol=1e-6)


def test_backprop_pipeline_with_one_micro_batch_is_the_bprop_step():
  config = dni_config(None, 'bprop')
  bp = pl.make_backprop_pipeline(config, pl.stage_mesh(2), B, (2,), 1)
  ff = dni_jax.make_feedforward(config)
  state = bp.init(jax.random.key(0))
  ff_state = ff.init(jax.random.key(0))
  images, labels = batch(3)
  state, metrics = bp.train_step(state, images, labels)
  ff_state, ff_metrics = ff.train_step(ff_state, images, labels)
  chex.assert_trees_all_close(bp.to_feedforward(state), ff_state,
                              rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(metrics['loss'], ff_metrics['loss'], rtol=1e-6)


def test_backprop_pipeline_rejects_bad_micro_batches():
  assert pl.backprop_stages(dni_config(None, 'bprop'), (1, 3)) == (
      (0,), (1, 2), ())
  with pytest.raises(ValueError, match='num_microbatches=3'):
    pl.make_backprop_pipeline(dni_config(None, 'bprop'), pl.stage_mesh(2), B,
                              (2,), 3)


@pytest.mark.slow
def test_two_processes_compute_what_one_process_computes(tmp_path):
  """Two pinned processes (gloo over 127.0.0.1), one stage each: the state
  after three ticks equals the in-process result on two fake devices."""
  spec = benchmarking.check_spec()
  results = benchmarking.launch_workers(2, spec, str(tmp_path), timeout=240)
  expected = benchmarking.run_check(spec)   # In-process, fake devices.
  for process_id, result in enumerate(results):
    for name, value in result['stage_state'].items():
      np.testing.assert_allclose(
          np.asarray(value), np.asarray(expected[name][process_id]),
          rtol=1e-5, atol=1e-6, err_msg=name)


TRAIN_FF = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'scripts', 'train_ff.py')


def run_train_ff(*args):
  return subprocess.run([sys.executable, TRAIN_FF, *args], capture_output=True,
                        text=True, timeout=400)


@pytest.mark.slow
def test_train_ff_pipeline_learns_and_resumes_bit_identically(tmp_path,
                                                              mnist_dir):
  dni = tmp_path / 'dni'
  args = [f'--workdir={dni}', '--method=cdni', '--pipeline=dni',
          f'--data_dir={mnist_dir}', '--num_layers=3', '--hidden_size=32',
          '--sg_hidden_size=32', '--learning_rate=3e-3', '--lr_boundaries=',
          '--batch_size=32', '--eval_every=20', '--log_every=10',
          '--checkpoint_every=20', '--num_steps=40']
  proc = run_train_ff(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((dni / 'config.json').read_text())
  assert config['pipeline'] == 'dni' and config['pipeline_stages'] == 3
  def read_rows(workdir):   # Less the elapsed training time.
    return [{k: v for k, v in json.loads(l).items() if k != 'train_time'}
            for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  rows = read_rows(dni)
  assert [r['step'] for r in rows] == [20, 40]
  assert len(rows[-1]['sg_loss']) == 2 and len(rows[-1]['sg_cosine']) == 2
  result = json.loads((dni / 'result.json').read_text())
  assert result['pipeline_stages'] == 3 and result['test_error'] < 40.0
  # As if it had crashed after step 20: the rerun resumes the pipeline state
  # (in-flight activations included) and repeats the same metrics.
  shutil.rmtree(dni / 'checkpoints' / '40')
  (dni / 'result.json').unlink()
  proc = run_train_ff(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from' in proc.stderr
  assert read_rows(dni) == rows
  # One program per stage (--pipeline_programs=per_stage) computes the same
  # ticks: the same metrics, row for row; and it resumes likewise.
  per_stage = tmp_path / 'per_stage'
  args = [f'--workdir={per_stage}', '--pipeline_programs=per_stage'] + args[1:]
  proc = run_train_ff(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((per_stage / 'config.json').read_text())[
      'pipeline_programs'] == 'per_stage'
  assert json.loads((per_stage / 'result.json').read_text())[
      'pipeline_programs'] == 'per_stage'
  assert read_rows(per_stage) == rows
  shutil.rmtree(per_stage / 'checkpoints' / '40')
  (per_stage / 'result.json').unlink()
  proc = run_train_ff(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from' in proc.stderr
  assert read_rows(per_stage) == rows


@pytest.mark.parametrize('kwargs,needle', [
    (dict(method='dni', pipeline='bprop', pipeline_stages=2),
     '--pipeline=bprop needs --method=bprop'),
    (dict(method='bprop', pipeline='bprop'), 'needs --pipeline_stages'),
    (dict(method='cdni', pipeline='dni', pipeline_stages=2, dni_layers=(1, 2)),
     '--pipeline_stages=2'),
    (dict(method='bprop', pipeline='bprop', pipeline_stages=2,
          pipeline_microbatches=3), '--pipeline_microbatches=3'),
    (dict(method='cdni', pipeline_stages=2), '--pipeline_stages needs'),
    (dict(method='cdni', pipeline='dni', num_devices=2), '--num_devices'),
    (dict(method='cdni', pipeline='dni', pipeline_stages=9),
     '--pipeline_stages=9'),
    (dict(method='cdni', pipeline='gpipe'), '--pipeline=gpipe'),
    (dict(method='bprop', pipeline='bprop', pipeline_stages=2,
          pipeline_programs='per_stage'),
     '--pipeline_programs=per_stage needs --pipeline=dni'),
    (dict(method='cdni', pipeline='dni', pipeline_programs='mpmd'),
     '--pipeline_programs=mpmd: must be one or per_stage'),
    # The pipeline's own check (pipeline.check_dni_config), under the flag.
    (dict(method='bprop', pipeline='dni', pipeline_stages=2),
     '--pipeline=dni: the decoupled pipeline needs method dni or cdni, not '
     'bprop'),
    (dict(method='cdni', pipeline='dni', p_update=0.5),
     '--pipeline=dni: the decoupled pipeline does not implement '
     'synthetic_inputs or p_update < 1'),
    (dict(method='cdni', pipeline='dni', dni_layers=()),
     '--pipeline=dni: the decoupled pipeline needs at least one interface'),
])
def test_bad_pipeline_settings_are_refused_naming_the_flag(kwargs, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    experiments.FeedForwardExperiment(workdir='/tmp/unused', batch_size=32,
                                      **kwargs)


def test_pipeline_stages_split_the_hidden_layers_evenly():
  exp = experiments.FeedForwardExperiment(
      workdir='/tmp/unused', method='cdni', num_layers=5, pipeline='dni',
      pipeline_stages=2)
  assert exp.pipeline_boundaries == (2,) and exp.resolved_dni_layers == (2,)
  assert exp.config_record()['dni_layers'] == [2]
  every = experiments.FeedForwardExperiment(
      workdir='/tmp/unused', method='cdni', num_layers=4, pipeline='dni')
  assert every.pipeline_boundaries == (1, 2, 3)
  assert every.config_record()['pipeline_stages'] == 4


@pytest.mark.slow
def test_train_ff_bad_pipeline_flag_is_one_error_line(tmp_path, mnist_dir):
  proc = run_train_ff(f'--workdir={tmp_path}/w', f'--data_dir={mnist_dir}',
                      '--method=bprop', '--pipeline=bprop')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith('train_ff.py: error: --pipeline=bprop needs '
                              '--pipeline_stages'), proc.stderr[-2000:]

"""The per-stage (MPMD) decoupled pipeline against the SPMD pipeline.

Fake CPU devices (conftest: 4) stand in for the stage devices.
"""

import functools

import chex
import jax
import numpy as np
import pytest

import dni_jax
from dni_jax import device_pipeline as dp
from dni_jax import pipeline as pl

B = 8


def dni_config(dni_layers=(1, 2), method='cdni', **kw):
  args = dict(input_shape=(4, 4, 1), num_classes=10, num_layers=4,
              hidden_size=8, method=method, model='fcn',
              sg_hidden_layers=1 if method == 'dni' else 0, sg_hidden_size=16,
              learning_rate=1e-2, lr_boundaries=(), dni_layers=dni_layers)
  args.update(kw)
  return dni_jax.FeedForwardConfig(**args)


def batch(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.uniform(k1, (B, 4, 4, 1)),
          jax.random.randint(k2, (B,), 0, 10))


@functools.lru_cache(maxsize=None)
def make(config):
  return dp.make_device_pipeline(config, B)


@pytest.mark.parametrize('method,dni_layers', [
    ('dni', (2,)), ('cdni', (1, 2))])
def test_ticks_equal_the_spmd_pipeline(method, dni_layers):
  config = dni_config(dni_layers, method)
  S = len(config.blocks)
  spmd = pl.make_pipeline(config, pl.stage_mesh(S), B)
  pipe = make(config)
  state = pipe.init(jax.random.key(0))
  reference = spmd.init(jax.random.key(0))
  for seed in range(S + 2):   # Through the fill, then every module moves.
    images, labels = batch(seed)
    state, metrics = pipe.tick(state, images, labels)
    reference, expected = spmd.tick(reference, images, labels)
    chex.assert_trees_all_equal(metrics, expected)
    chex.assert_trees_all_equal(pipe.to_feedforward(state),
                                spmd.to_feedforward(reference))
  assert float(metrics['loss']) > 0
  np.testing.assert_array_equal(metrics['block_updated'], [True] * S)
  for s, stage in enumerate(state.stages[1:], 1):
    np.testing.assert_array_equal(stage.inputs, reference.inputs[s])
    np.testing.assert_array_equal(stage.input_labels,
                                  reference.input_labels[s])


def test_each_stage_lives_on_its_own_device_without_placeholders():
  config = dni_config()
  pipe = make(config)
  state = pipe.init(jax.random.key(0))
  state, metrics = pipe.tick(state, *batch(0))
  state, metrics = pipe.tick(state, *batch(1))
  assert len(pipe.devices) == 3 and len(set(pipe.devices)) == 3
  for s, stage in enumerate(state.stages):
    for leaf in jax.tree.leaves(stage):
      assert leaf.devices() == {pipe.devices[s]}, s
  for leaf in jax.tree.leaves(metrics):
    assert leaf.devices() == {pipe.devices[0]}
  np.testing.assert_array_equal(metrics['block_updated'], [True, True, False])
  ff_state = dni_jax.make_feedforward(config).init(jax.random.key(0))
  nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
  assert sum(nbytes((st.block, st.synthetic)) for st in state.stages) == (
      nbytes((ff_state.layers, ff_state.head, ff_state.synthetic)))


def test_round_trip_and_eval_match_the_network():
  config = dni_config()
  pipe = make(config)
  ff = dni_jax.make_feedforward(config)
  ff_state = ff.init(jax.random.key(3))
  chex.assert_trees_all_equal(pipe.to_feedforward(
      pipe.from_feedforward(ff_state)), ff_state)
  state = pipe.from_feedforward(ff_state)
  for seed in range(4):
    state, _ = pipe.tick(state, *batch(seed))
  images, labels = batch(9)
  chex.assert_trees_all_equal(
      pipe.to_feedforward(pipe.from_feedforward(pipe.to_feedforward(state))),
      pipe.to_feedforward(state))
  chex.assert_trees_all_close(
      pipe.eval_batch(state, images, labels),
      ff.eval_batch(pipe.to_feedforward(state), images, labels))


def test_donated_ticks_compute_the_same():
  config = dni_config((2,), 'dni')
  pipe = make(config)
  donating = dp.make_device_pipeline(config, B, donate=True)
  state = pipe.init(jax.random.key(0))
  donated = donating.init(jax.random.key(0))
  for seed in range(3):
    state, _ = pipe.tick(state, *batch(seed))
    donated, _ = donating.tick(donated, *batch(seed))
  chex.assert_trees_all_equal(donating.to_feedforward(donated),
                              pipe.to_feedforward(state))


def test_rejects_what_it_cannot_run():
  with pytest.raises(ValueError, match='method dni or cdni'):
    dp.make_device_pipeline(dni_config(None, 'bprop'), B)
  with pytest.raises(ValueError, match='3 stages need 3 devices; 2 devices'):
    dp.make_device_pipeline(dni_config(), B, devices=jax.devices()[:2])

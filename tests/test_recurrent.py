"""Recurrent DNI (Sec. 2.2, Fig. 3, 4): the scan unroll, the oracle boundary
gradient, the synthetic-gradient target, the DNI and DNI+Aux losses."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dni_jax import interface
from dni_jax import recurrent

import conftest

B, H, I, T = 3, 5, 4, 3
TOL = dict(atol=1e-5, rtol=1e-5)


def _config(core='lstm', method='dni', loss='bernoulli', **kw):
  return recurrent.RecurrentConfig(core=core, input_size=I, output_size=I,
                                   hidden_size=H, unroll=T, method=method,
                                   loss=loss, **kw)


@functools.lru_cache(maxsize=None)
def _jit_step(config):
  """One compile per configuration (eager scans are slow to dispatch)."""
  return jax.jit(functools.partial(recurrent.train_step, config))


def _chunk(seed, length=T, resets=None):
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(B, length, I)).astype(np.float32)
  targets = rng.integers(0, 2, size=(B, length, I)).astype(np.float32)
  mask = (rng.random((B, length)) < 0.8).astype(np.float32)
  if resets is None:
    resets = np.zeros((B, length), np.float32)
  return recurrent.Chunk(jnp.asarray(inputs), jnp.asarray(targets),
                         jnp.asarray(mask), jnp.asarray(resets))


def _random_state(config, seed):
  keys = jax.random.split(jax.random.key(seed), config.num_state)
  return tuple(jax.random.normal(k, (B, H)) for k in keys)


def _randomise(params, seed):
  """Non-zero heads (the zero-initialised last layers would hide bugs)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize('core', recurrent.CORES)
def test_scan_unroll_equals_python_unrolled_reference(core):
  config = _config(core)
  params = recurrent.init_params(config, jax.random.key(0))['core']
  state0 = _random_state(config, 1)
  resets = np.zeros((B, T), np.float32)
  resets[1, 2] = 1.0   # Stream 1 starts a new episode at step 2.
  chunk = _chunk(2, resets=resets)
  state_T, y, states = recurrent.unroll(config, params, state0, chunk.inputs,
                                        chunk.resets)
  step = recurrent.core_step_fn(config)
  state, ys = state0, []
  for t in range(T):
    state = tuple(s * (1.0 - chunk.resets[:, t][:, None]) for s in state)
    state, y_t = step(params, state, chunk.inputs[:, t])
    ys.append(y_t)
    for s_ref, s_all in zip(state, states):
      chex.assert_trees_all_close(s_all[:, t], s_ref, **TOL)
  chex.assert_trees_all_close(y, jnp.stack(ys, axis=1), **TOL)
  chex.assert_trees_all_close(state_T, state, **TOL)
  assert y.shape == (B, T, H)


def test_lstm_has_peepholes_and_graves_equations():
  config = _config('lstm')
  params = recurrent.init_params(config, jax.random.key(0))['core']
  h, c = _random_state(config, 1)
  x = jax.random.normal(jax.random.key(2), (B, I))
  (h1, c1), y = recurrent.lstm_step(params, (h, c), x)
  z = np.asarray(x @ params['w_x'] + h @ params['w_h']) + np.asarray(
      params['b'])
  zi, zf, zc, zo = np.split(z, 4, axis=-1)
  c = np.asarray(c)
  p = np.asarray(params['peephole'])
  sig = lambda v: 1 / (1 + np.exp(-v))
  c_ref = sig(zf + p[1] * c) * c + sig(zi + p[0] * c) * np.tanh(zc)
  h_ref = sig(zo + p[2] * c_ref) * np.tanh(c_ref)
  np.testing.assert_allclose(c1, c_ref, **TOL)
  np.testing.assert_allclose(h1, h_ref, **TOL)
  np.testing.assert_allclose(y, h1)


@pytest.mark.parametrize('core,loss', [
    ('lstm', 'bernoulli'), ('lstm', 'categorical'), ('rnn', 'bernoulli'),
    ('leaky_rnn', 'categorical')])
def test_oracle_boundary_gradient_gives_full_bptt_gradient(core, loss):
  """Eq. (3): with delta_T the true gradient from the future (full BPTT over
  2T steps), the T-step update equals the full-BPTT gradient."""
  config = _config(core, loss=loss)
  params = recurrent.init_params(config, jax.random.key(0))
  state0 = _random_state(config, 1)
  whole = _chunk(3, length=2 * T)
  if loss == 'categorical':
    rng = np.random.default_rng(4)
    whole = whole._replace(
        inputs=jnp.asarray(rng.integers(0, I, (B, 2 * T)), jnp.int32),
        targets=jnp.asarray(rng.integers(0, I, (B, 2 * T)), jnp.int32))
  first = jax.tree.map(lambda a: a[:, :T], whole)
  second = jax.tree.map(lambda a: a[:, T:], whole)

  @jax.jit   # One compile instead of many eager scans.
  def compute(params, state0):
    trainable = {'core': params['core'], 'readout': params['readout']}
    full = jax.grad(
        lambda p: recurrent.unroll_loss(config, p, state0, whole)[0][0])(
            trainable)
    # The future: the second unroll with delta = 0 at its end (the sequence
    # ends); its initial-state gradient is the oracle delta_T of the first.
    state_T, _, _ = recurrent.unroll(config, params['core'], state0,
                                     first.inputs, first.resets)
    zeros = tuple(jnp.zeros_like(s) for s in state_T)
    future = recurrent.unroll_gradients(config, params, state_T, second, zeros)
    now = recurrent.unroll_gradients(config, params, state0, first,
                                     future.initial_state_grad)
    truncated = recurrent.unroll_gradients(config, params, state0, first,
                                           zeros)
    return (full, jax.tree.map(jnp.add, now.grads, future.grads),
            truncated.grads)

  full, dni_oracle, truncated = compute(params, state0)
  chex.assert_trees_all_close(dni_oracle, full, atol=1e-5, rtol=1e-4)
  # Plain truncated BPTT (delta_T = 0) does not: the oracle mattered.
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                      truncated, full)
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_sg_target_is_vjp_wrt_initial_state_per_example():
  config = _config('lstm')
  params = _randomise(recurrent.init_params(config, jax.random.key(0)), 5)
  state0 = _random_state(config, 1)
  chunk = _chunk(2)
  delta = _random_state(config, 3)
  out = jax.jit(lambda p, s0, d: recurrent.unroll_gradients(
      config, p, s0, chunk, d))(params, state0, delta)

  def objective(s0):   # L + <delta_T, s_T> / B: the vjp's function.
    (loss, s_T), _ = recurrent.unroll_loss(config, params, s0, chunk)
    return loss + sum(jnp.sum(d * s) for d, s in zip(delta, s_T)) / B
  expected = jax.jit(jax.grad(objective))(state0)
  chex.assert_trees_all_close(out.initial_state_grad,
                              tuple(B * g for g in expected), **TOL)
  (loss, _), _ = recurrent.unroll_loss(config, params, state0, chunk)
  np.testing.assert_allclose(out.loss, loss, rtol=1e-6)


def test_first_dni_step_equals_bptt_step():
  """Zero-initialised M (A.1/A.3) emits delta_T = 0 and there is no previous
  boundary yet: the first DNI update of the core equals truncated BPTT's."""
  chunk = _chunk(2)
  states = {}
  for method in ('bptt', 'dni'):
    config = _config('lstm', method)
    state = recurrent.init_state(config, jax.random.key(0), B, chunk.inputs)
    states[method], metrics = _jit_step(config)(state, chunk)
    assert float(metrics['sg_loss']) == 0.0
  for part in ('core', 'readout'):
    chex.assert_trees_all_close(states['dni'].params[part],
                                states['bptt'].params[part], **TOL)
  chex.assert_trees_all_close(states['dni'].carry.core,
                              states['bptt'].carry.core, **TOL)


def _two_steps(method, sg_into_core=False, sg_scale=0.1):
  config = _config('lstm', method, sg_into_core=sg_into_core,
                   sg_scale=sg_scale)
  c1, c2 = _chunk(2), _chunk(3)
  state = recurrent.init_state(config, jax.random.key(0), B, c1.inputs)
  state = state._replace(params=_randomise(state.params, 7))
  state1, _ = _jit_step(config)(state, c1)
  state2, metrics = _jit_step(config)(state1, c2)
  return config, (c1, c2), (state, state1, state2), metrics


def test_dni_step_consumes_scaled_sg_and_regresses_previous_boundary():
  config, (c1, c2), (state0, state1, state2), metrics = _two_steps(
      'dni', sg_scale=0.25)
  p = state1.params
  replay = (state1.carry.replay_start, state1.carry.replay_inputs,
            state1.carry.replay_resets)
  assert replay[1].shape == (B, 1, I)

  @jax.jit   # One compile instead of many eager scans.
  def reference(p0, p, carry, opt_state):
    replay = (carry.replay_start, carry.replay_inputs, carry.replay_resets)
    # The carry holds s_T and, for the extra core of Fig. 4, the last step
    # and the state before it: replayed with the parameters that ran it, it
    # ends in s_T.
    s_T, _, _ = recurrent.unroll(config, p0['core'], *replay)
    # M(y_T) of step 1 is recomputed with the current parameters.
    _, y1, _ = recurrent.unroll(config, p['core'], *replay)
    # Step 2's boundary gradient is 0.25 * M(y_T); its s_0 gradient is the
    # target of step 1's M(y_T).
    _, y2, _ = recurrent.unroll(config, p['core'], carry.core, c2.inputs,
                                c2.resets)
    delta = recurrent.split_state(config, 0.25 * recurrent.mlp_apply(
        p['sg'], y2[:, -1]))
    ref = recurrent.unroll_gradients(config, p, carry.core, c2, delta)
    sg_loss_fn = lambda q: interface.synthetic_gradient_loss(
        recurrent.mlp_apply(q, y1[:, -1]),
        recurrent.flatten_state(ref.initial_state_grad))
    # Without sg_into_core the core's gradient is the unroll's alone; the
    # update is Adam's, so compare with the step Adam takes on these grads.
    grads = {'core': ref.grads['core'], 'readout': ref.grads['readout'],
             'sg': jax.grad(sg_loss_fn)(p['sg'])}
    updates, _ = recurrent.make_optimizer(config).update(grads, opt_state, p)
    return (s_T, sg_loss_fn(p['sg']), ref.loss,
            jax.tree.map(jnp.add, p, updates))

  s_T, expected_sg_loss, expected_loss, expected_params = reference(
      state0.params, p, state1.carry,
      conftest.one_adam_state(state1.opt_state))
  chex.assert_trees_all_close(s_T, state1.carry.core, **TOL)
  np.testing.assert_allclose(metrics['sg_loss'], expected_sg_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], expected_loss, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['aux_loss']), 0.0)
  chex.assert_trees_all_close(state2.params, expected_params, atol=1e-6,
                              rtol=1e-5)


def test_sg_into_core_changes_only_the_core_update():
  _, _, (_, _, off), _ = _two_steps('dni', sg_into_core=False)
  _, _, (_, _, on), _ = _two_steps('dni', sg_into_core=True)
  chex.assert_trees_all_close(on.params['sg'], off.params['sg'], **TOL)
  chex.assert_trees_all_close(on.params['readout'], off.params['readout'],
                              **TOL)
  delta = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       on.params['core'], off.params['core'])
  assert max(jax.tree.leaves(delta)) > 1e-7


def test_dni_aux_predicts_the_synthetic_gradient_T_steps_ahead():
  config, (c1, c2), (_, state1, _), metrics = _two_steps('dni_aux')
  p = state1.params
  # The carry keeps the whole previous unroll (K = T) from its s_0.
  assert state1.carry.replay_inputs.shape == (B, T, I)

  @jax.jit
  def reference(p, carry):
    _, y1, _ = recurrent.unroll(config, p['core'], carry.replay_start,
                                c1.inputs, c1.resets)
    _, y2, _ = recurrent.unroll(config, p['core'], carry.core, c2.inputs,
                                c2.resets)
    # A(y_t) of the previous unroll targets M(y_{t+T}), this unroll's step t.
    return jnp.mean(jnp.stack([interface.synthetic_gradient_loss(
        recurrent.mlp_apply(p['aux'], y1[:, t]),
        recurrent.mlp_apply(p['sg'], y2[:, t])) for t in range(T)]))

  expected = reference(p, state1.carry)
  np.testing.assert_allclose(metrics['aux_loss'], expected, rtol=1e-5)
  assert float(metrics['aux_loss']) > 0


def test_reset_at_chunk_start_makes_the_target_zero():
  """A new episode at the unroll's first step: no gradient flows to the
  previous episode, so the synthetic gradient's target is exactly zero."""
  config = _config('lstm')
  params = _randomise(recurrent.init_params(config, jax.random.key(0)), 5)
  resets = np.zeros((B, T), np.float32)
  resets[:, 0] = 1.0
  out = recurrent.unroll_gradients(config, params, _random_state(config, 1),
                                   _chunk(2, resets=resets),
                                   _random_state(config, 3))
  for g in out.initial_state_grad:
    np.testing.assert_array_equal(g, 0.0)


def test_make_recurrent_jits_and_trains():
  config = _config('rnn', 'dni_aux', loss='categorical')
  rec = recurrent.make_recurrent(config)
  rng = np.random.default_rng(0)
  chunk = recurrent.Chunk(
      jnp.asarray(rng.integers(0, I, (B, T)), jnp.int32),
      jnp.asarray(rng.integers(0, I, (B, T)), jnp.int32),
      jnp.ones((B, T)), jnp.zeros((B, T)))
  state = rec.init(jax.random.key(0), B, chunk.inputs)
  for _ in range(3):
    state, metrics = rec.train_step(state, chunk)
  chex.assert_tree_all_finite(metrics)
  assert int(state.step) == 3
  _, sums = rec.evaluate_chunk(state.params, recurrent.zero_state(config, B),
                               chunk)
  assert float(sums['count']) == B * T


@pytest.mark.parametrize('field,value,match', [
    ('core', 'gru', "core='gru'"),
    ('method', 'rtrl', "method='rtrl'"),
    ('unroll', 0, 'unroll=0'),
    ('sg_scale', -1.0, 'sg_scale=-1.0'),
])
def test_bad_config_is_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    recurrent.make_recurrent(_config()._replace(**{field: value}))

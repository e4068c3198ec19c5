"""Recurrent DNI and DNI+Aux (Sec. 2.2, 3.2, A.3) against a reference step
written here from the paper, not from dni_jax's chains: every parameter and
Adam moment after several `train_step`s, which loss moves which parameter, and
every default A.3 fixes.

The reference, per unroll of T steps from the carried state s_0 (Fig. 3, 4;
per-example gradients cross the boundary, README's convention):

  J(theta, s_0) = L(theta, s_0) + <stop_grad(0.1 M(h_T)), s_T> / B
      L: batch mean of the unroll's loss summed over its T steps; M reads the
      core's output at the boundary and predicts the gradient of (h_T, c_T).
  target = B dJ/ds_0: the regression target of the synthetic gradient emitted
      at the previous boundary (one unroll stale);
  L_sg = mean_b || M(h'_T) - target ||^2, h'_T the previous unroll's boundary
      output, recomputed with the current core from the state kept in memory
      (the last core for DNI, the whole previous unroll for DNI+Aux; Fig. 4);
  L_aux = mean_t mean_b || A(h'_t) - stop_grad(M(h_{t+T})) ||^2 over the
      previous unroll's T steps (DNI+Aux: predict the synthetic gradient T
      steps ahead); every loss weighted 1 (A.3);
  one Adam step on dJ/d(core, readout) + d(L_sg + L_aux)/d(core, M, A).
"""

import functools
import os
import subprocess
import sys
from typing import Any, NamedTuple
import xml.etree.ElementTree as ET

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest

from dni_jax import recurrent
from dni_jax import rnn_experiments
from dni_jax import rnn_tasks

B, H, I, T = 3, 5, 4, 3
LR = 1e-2          # Large enough that each update changes the next step.
SG_SCALE = 0.1     # A.3: the synthetic gradient is scaled by 0.1 when consumed.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _add(x, b):
  """x[..., D] + b[D] (explicit broadcast: the tests forbid rank promotion)."""
  return x + b.reshape((1,) * (x.ndim - 1) + b.shape)


# ---------------------------------------------------------------------------
# The model, written out: Graves' (2013) peephole LSTM or a tanh RNN, a linear
# readout, and one-hidden-layer M and A.
# ---------------------------------------------------------------------------

def _lstm(p, state, x):
  h, c = state
  z = _add(x @ p['w_x'] + h @ p['w_h'], p['b'])
  zi, zf, zc, zo = jnp.split(z, 4, axis=-1)
  w_ci, w_cf, w_co = (p['peephole'][k][None] for k in range(3))
  c = (jax.nn.sigmoid(zf + w_cf * c) * c
       + jax.nn.sigmoid(zi + w_ci * c) * jnp.tanh(zc))
  h = jax.nn.sigmoid(zo + w_co * c) * jnp.tanh(c)
  return (h, c)


def _rnn(p, state, x):
  return (jnp.tanh(_add(x @ p['w_x'] + state[0] @ p['w_h'], p['b'])),)


def _run(config, p_core, s0, inputs, resets):
  """The core over the steps of `inputs`, state zeroed where an episode
  starts. Returns (the state after every step, outputs y = h, [B, L, H])."""
  cell = {'lstm': _lstm, 'rnn': _rnn}[config.core]
  if config.loss == 'categorical':
    inputs = jax.nn.one_hot(inputs, config.input_size)
  states, s = [], s0
  for t in range(inputs.shape[1]):
    s = cell(p_core, tuple(v * (1.0 - resets[:, t, None]) for v in s),
             inputs[:, t])
    states.append(s)
  return states, jnp.stack([s[0] for s in states], axis=1)


def _mlp(p, y):
  return _add(jax.nn.relu(_add(y @ p['w1'], p['b1'])) @ p['w2'], p['b2'])


def _task_loss(config, p_readout, y, chunk):
  """L: (1/B) sum_b sum_t mask * loss_t, in nats."""
  logits = _add(y @ p_readout['w'], p_readout['b'])
  if config.loss == 'categorical':
    per_step = -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(
        chunk.targets, config.output_size), axis=-1)
  else:   # Bits: sigmoid cross-entropy summed over the output bits.
    per_step = jnp.sum(jnp.logaddexp(0.0, logits) - chunk.targets * logits,
                       axis=-1)
  return jnp.sum(per_step * chunk.mask) / B


def _l2(prediction, target):
  return jnp.mean(jnp.sum(jnp.square(prediction - target), axis=-1))


# ---------------------------------------------------------------------------
# The reference step.
# ---------------------------------------------------------------------------

def _objective(config, params, s0, chunk):
  """Eq. (3) with the bootstrapped boundary: J = L + <stop_grad(0.1 M(h_T)),
  s_T> / B, s_T = (h_T, c_T) concatenated as M's output is."""
  states, y = _run(config, params['core'], s0, chunk.inputs, chunk.resets)
  s_T = jnp.concatenate(states[-1], axis=-1)
  delta_T = jax.lax.stop_gradient(SG_SCALE * _mlp(params['sg'], y[:, -1]))
  loss = _task_loss(config, params['readout'], y, chunk)
  return loss + jnp.sum(delta_T * s_T) / B, (loss, states, y)


def _sg_loss(config, params, memory, target):
  """M at the previous boundary regressed to this unroll's target."""
  _, y_prev = _run(config, params['core'], *memory)
  h_T = y_prev[:, -1]
  if not config.sg_into_core:
    h_T = jax.lax.stop_gradient(h_T)
  return _l2(_mlp(params['sg'], h_T), target)


def _aux_loss(config, params, memory, y_now):
  """A(h'_t) of the previous unroll regressed to M(h_{t+T}), this unroll's
  step t, averaged over the T steps."""
  _, y_prev = _run(config, params['core'], *memory)
  ahead = jax.lax.stop_gradient(_mlp(params['sg'], y_now))
  return jnp.mean(jnp.stack([
      _l2(_mlp(params['aux'], y_prev[:, t]), ahead[:, t]) for t in range(T)]))


def _kept_in_memory(config, s0, states, chunk):
  """Fig. 4: what this unroll leaves for the next step's losses: its last core
  (DNI) or all T cores (DNI+Aux), with the state they start from."""
  if config.method == 'dni_aux':
    return (s0, chunk.inputs, chunk.resets)
  return (states[-2], chunk.inputs[:, -1:], chunk.resets[:, -1:])


def _gradient_terms(config, params, s0, chunk, memory):
  """Each loss's gradient w.r.t. every parameter, the losses, and what the
  next step needs (s_T, the kept cores)."""
  (_, (loss, states, y)), (g_task, g_s0) = jax.value_and_grad(
      functools.partial(_objective, config), argnums=(0, 1), has_aux=True)(
          params, s0, chunk)
  terms, losses = {'task': g_task}, {'loss': loss}
  if memory is not None:
    target = B * jnp.concatenate(g_s0, axis=-1)
    losses['sg_loss'], terms['sg'] = jax.value_and_grad(
        functools.partial(_sg_loss, config), argnums=0)(params, memory, target)
    if config.method == 'dni_aux':
      losses['aux_loss'], terms['aux'] = jax.value_and_grad(
          functools.partial(_aux_loss, config), argnums=0)(params, memory, y)
  return (terms, losses, states[-1],
          _kept_in_memory(config, s0, states, chunk))


class _Reference(NamedTuple):
  params: Any
  opt_state: Any
  s0: Any
  memory: Any


def _reference_steps(config, params, s0, chunks):
  """Adam on the sum of every loss's gradient, one unroll after another."""
  ref = _Reference(params, optax.adam(LR).init(params), s0, None)
  all_losses = []
  for chunk in chunks:
    ref, losses = _reference_step(config, ref, chunk)
    all_losses.append(losses)
  return ref, all_losses


@functools.partial(jax.jit, static_argnums=0)
def _reference_step(config, ref, chunk):
  terms, losses, s_T, memory = _gradient_terms(config, ref.params, ref.s0,
                                               chunk, ref.memory)
  grads = jax.tree.map(lambda *g: sum(g), *terms.values())
  updates, opt_state = optax.adam(LR).update(grads, ref.opt_state, ref.params)
  return _Reference(optax.apply_updates(ref.params, updates), opt_state, s_T,
                    memory), losses


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------

def _config(core='lstm', loss='bernoulli', method='dni_aux',
            sg_into_core=False):
  return recurrent.RecurrentConfig(
      core=core, input_size=I, output_size=I, hidden_size=H, unroll=T,
      method=method, loss=loss, sg_into_core=sg_into_core, learning_rate=LR)


def _chunks(config, count=3):
  """Random data; one stream starts a new episode inside the 2nd unroll and
  one at the start of the 3rd."""
  rng = np.random.default_rng(0)
  chunks = []
  for k in range(count):
    if config.loss == 'categorical':
      inputs = rng.integers(0, I, (B, T)).astype(np.int32)
      targets = rng.integers(0, I, (B, T)).astype(np.int32)
    else:
      inputs = rng.normal(size=(B, T, I)).astype(np.float32)
      targets = rng.integers(0, 2, (B, T, I)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    resets = np.zeros((B, T), np.float32)
    if k == 1:
      resets[1, 1] = 1.0
    if k == 2:
      resets[0, 0] = 1.0
    chunks.append(recurrent.Chunk(*map(jnp.asarray,
                                       (inputs, targets, mask, resets))))
  return chunks


def _initial_state(config, chunk):
  """Random parameters everywhere (M's and A's zero-initialised last layers
  would hide most bugs) and a random carried state."""
  state = recurrent.init_state(config, jax.random.key(0), B, chunk.inputs)
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves) + 2)
  params = jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  s0 = tuple(jax.random.normal(keys[-1 - i], (B, H))
             for i in range(config.num_state))
  return state._replace(params=params, carry=state.carry._replace(core=s0))


def _float64(tree):
  """Runs in float64 (inside `jax.enable_x64`), so that the library and the
  reference, which round differently in float32, agree far inside rtol 1e-5
  on every machine."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@functools.lru_cache(maxsize=None)
def _jit_step(config):
  return jax.jit(functools.partial(recurrent.train_step, config))


_copy = conftest.copy_tree
_assert_close = conftest.assert_tree_close


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('core,loss,method,sg_into_core', [
    ('lstm', 'bernoulli', 'dni_aux', False),
    ('lstm', 'bernoulli', 'dni_aux', True),
    ('rnn', 'categorical', 'dni_aux', False),
    ('lstm', 'bernoulli', 'dni', True),
])
def test_train_steps_equal_the_reference(core, loss, method, sg_into_core):
  """Three unrolls: every parameter, both Adam moments, the carried state
  and the reported losses equal the reference's."""
  config = _config(core, loss, method, sg_into_core)
  with jax.enable_x64(True):
    chunks = _float64(_chunks(config))
    state = _float64(_initial_state(config, chunks[0]))
    ref, ref_losses = _reference_steps(config, state.params, state.carry.core,
                                       chunks)
    step = _jit_step(config)
    for chunk, expected in zip(chunks, ref_losses):
      state, metrics = step(state, chunk)
      for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5,
                                   err_msg=name)
  assert state.params['core']['w_h'].dtype == jnp.float64
  assert int(state.step) == len(chunks)
  _assert_close(state.params, ref.params)
  _assert_close(conftest.one_adam_state(state.opt_state), ref.opt_state)
  _assert_close(state.carry.core, ref.s0)


@pytest.mark.parametrize('sg_into_core', [False, True])
def test_dni_aux_which_losses_move_which_parameters(sg_into_core):
  """The second update's gradient, read from Adam's first moment (from a
  fresh optimiser state, mu = (1 - b1) g), split by loss: the readout moves
  with the task objective only; M with its regression loss only (the aux
  target M(h_{t+T}) is a constant); A with the aux loss only; the core with
  the task objective and the aux loss (and M's loss with sg_into_core), each
  term visible."""
  config = _config(sg_into_core=sg_into_core)
  with jax.enable_x64(True):
    chunks = _float64(_chunks(config, count=2))
    state0 = _float64(_initial_state(config, chunks[0]))
    step = _jit_step(config)
    state1, _ = step(_copy(state0), chunks[0])
    fresh = state1._replace(opt_state={
        name: optax.adam(LR).init(p) for name, p in state1.params.items()})
    state2, _ = step(_copy(fresh), chunks[1])
    grads = jax.tree.map(lambda mu: mu / 0.1,
                         conftest.one_adam_state(state2.opt_state)[0].mu)
    memory = (state0.carry.core, chunks[0].inputs, chunks[0].resets)
    terms, _, _, _ = jax.jit(functools.partial(_gradient_terms, config))(
        state1.params, state1.carry.core, chunks[1], memory)
  task, sg, aux = jax.tree.map(np.asarray, (terms['task'], terms['sg'],
                                             terms['aux']))
  core = jax.tree.map(lambda *g: sum(g), task['core'], aux['core'],
                      *([sg['core']] if sg_into_core else []))
  _assert_close(grads['readout'], task['readout'])
  _assert_close(grads['sg'], sg['sg'])
  _assert_close(grads['aux'], aux['aux'])
  _assert_close(grads['core'], core)
  # Every term that moves the core is large enough to be seen in the sum.
  norm = lambda tree: np.sqrt(sum(np.sum(np.square(x))
                                  for x in jax.tree.leaves(tree)))
  core_terms = [task['core'], aux['core']] + ([sg['core']] if sg_into_core
                                               else [])
  for term in core_terms:
    assert norm(term) > 1e-3 * norm(core)
  if not sg_into_core:   # M's loss does not reach the core.
    assert norm(sg['core']) == 0.0


def test_a3_defaults_in_the_model():
  """A.3: synthetic gradient scaled by 0.1 when consumed; Adam, lr 7e-5;
  M has one hidden layer as wide as the LSTM and outputs 2 x width (h and
  c), its last layer zero-initialised; the same shape for the aux head."""
  config = recurrent.RecurrentConfig(core='lstm', input_size=I, output_size=I,
                                     hidden_size=H, unroll=T,
                                     method='dni_aux')
  assert config.sg_scale == 0.1
  assert config.learning_rate == 7e-5
  params = recurrent.init_params(config, jax.random.key(0))
  for head in ('sg', 'aux'):
    chex.assert_shape(params[head]['w1'], (H, H))
    chex.assert_shape(params[head]['w2'], (H, 2 * H))
    np.testing.assert_array_equal(params[head]['w2'], 0.0)
    np.testing.assert_array_equal(params[head]['b2'], 0.0)
  # The optimiser is Adam with that learning rate: the same update.
  core = params['core']
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), core)
  ours = recurrent.make_optimizer(config)
  adam = optax.adam(7e-5)
  updates, _ = jax.jit(ours.update)(grads, ours.init(core), core)
  expected, _ = jax.jit(adam.update)(grads, adam.init(core), core)
  chex.assert_trees_all_equal(updates, expected)


def test_a3_defaults_in_the_experiment():
  """A.3's settings as the experiment's defaults: LSTM, Adam lr 7e-5, batch
  256, 256 units for Copy / Repeat Copy and 1024 for PTB, the 0.1 scale,
  PTB validated every 5k iterations; the curriculum's 0.15 bits threshold,
  Copy advancing N by one and Repeat Copy N and R alternately."""
  copy = rnn_experiments.RecurrentExperiment(workdir='w', task='copy')
  ptb = rnn_experiments.RecurrentExperiment(workdir='w', task='ptb')
  for exp in (copy, ptb):
    assert exp.core == 'lstm'
    assert exp.learning_rate == 7e-5
    assert exp.batch_size == 256
    assert exp.resolved['sg_scale'] == 0.1
  assert copy.resolved['hidden_size'] == 256
  assert ptb.resolved['hidden_size'] == 1024
  assert ptb.resolved['eval_every'] == 5000
  model = copy.model_config(8, 9, 'bernoulli')
  assert (model.core, model.hidden_size, model.sg_scale,
          model.learning_rate) == ('lstm', 256, 0.1, 7e-5)
  assert rnn_tasks.SOLVED_BITS == 0.15
  level = rnn_tasks.first_level('copy')
  assert (level.n, level.r) == (1, 1)
  assert rnn_tasks.next_level('copy', level)[:2] == (2, 1)
  levels = [level]
  for _ in range(4):
    levels.append(rnn_tasks.next_level('repeat_copy', levels[-1]))
  assert [lv[:2] for lv in levels] == [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3)]


@pytest.mark.slow
def test_train_rnn_flag_defaults_are_a3s():
  """scripts/train_rnn.py's flags (read from --helpxml) default to the A.3
  settings or to None, which the experiment resolves as above."""
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'train_rnn.py'),
       '--helpxml'], capture_output=True, text=True, cwd=REPO, timeout=120)
  defaults = {}
  for flag in ET.fromstring(proc.stdout).iter('flag'):
    if flag.findtext('file').endswith('train_rnn.py'):
      defaults[flag.findtext('name')] = flag.findtext('default')
  assert defaults['core'] == 'lstm'
  assert float(defaults['learning_rate']) == 7e-5
  assert int(defaults['batch_size']) == 256
  # None: resolved per task (256 / 1024 units) and per method (0.1).
  assert defaults['hidden_size'] == ''
  assert defaults['sg_scale'] == ''
  assert defaults['eval_every'] == ''

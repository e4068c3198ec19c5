"""The multi-network system (Sec. 3.3, A.4): task labels, recurrent BN, the
oracle-SG == backprop identity, zero gradient when decoupled, update counts,
and `scripts/train_multinet.py`'s workdir contract."""

import functools
import json
import os
import subprocess
import sys

from absl import logging
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dni_jax import multinet
from dni_jax import multinet_experiments

import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'train_multinet.py')
# One tiny configuration everywhere (the in-process experiment's too), so
# each mode's jitted functions compile once for the whole file.
B, T, D, H, LR = 4, 2, 784, 8, 1e-3
TOL = dict(atol=1e-5, rtol=1e-5)


def _config(mode):
  return multinet.MultinetConfig(
      mode=mode, tick=T, image_size=D, fcn_size=H, hidden_size=H,
      message_size=H, sg_hidden_size=H, learning_rate=LR)


def _copy(tree):
  """The jitted updates donate their states: keep the originals usable."""
  return jax.tree.map(jnp.copy, tree)


def _block(seed, previous=None):
  """A block of fake digits: random 'images' and random labels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=(B, T * T))
  a_targets, b_targets = multinet.stream_targets(labels, T, previous)
  images = rng.normal(size=(B, T * T, D)).astype(np.float32)
  return multinet.Block(jnp.asarray(images), jnp.asarray(a_targets),
                        jnp.asarray(b_targets)), labels


# ---------------------------------------------------------------------------
# The tasks.
# ---------------------------------------------------------------------------

def test_stream_targets_hand_checked():
  # T = 2: A answers after steps 1 and 3 (odd digits in each pair); B after
  # the same steps, the 3s among the last 4 digits.
  first = np.array([[3, 5, 2, 3],
                    [0, 0, 7, 9]])
  a, b = multinet.stream_targets(first, 2)
  np.testing.assert_array_equal(a, [[2, 1], [0, 2]])
  # Stream start: only the digits seen so far count.
  np.testing.assert_array_equal(b, [[1, 2], [0, 0]])
  second = np.array([[1, 3, 3, 3],
                     [3, 8, 6, 4]])
  a, b = multinet.stream_targets(second, 2, previous_BxL=first)
  np.testing.assert_array_equal(a, [[2, 2], [1, 0]])
  # Tick 0: the 2nd pair of `first` + the 1st pair here; tick 1: this block.
  np.testing.assert_array_equal(b, [[1 + 1, 3], [0 + 1, 1]])
  assert a.dtype == b.dtype == np.int32
  with pytest.raises(ValueError, match='tick\\^2 = 4'):
    multinet.stream_targets(first[:, :3], 2)


def test_digit_stream_is_a_function_of_seed_and_block():
  images = np.arange(20 * 4, dtype=np.float32).reshape(20, 2, 2)
  labels = np.arange(20) % 10
  stream = multinet_experiments.DigitStream(images, labels, T, B, seed=5,
                                            stream_id=0)
  block1 = stream.block(1)
  idx0, idx1 = stream.indices(0), stream.indices(1)
  np.testing.assert_array_equal(block1.images,
                                images.reshape(20, 4)[idx1])
  a, b = multinet.stream_targets(labels[idx1], T, labels[idx0])
  np.testing.assert_array_equal(block1.a_targets, a)
  np.testing.assert_array_equal(block1.b_targets, b)
  again = multinet_experiments.DigitStream(images, labels, T, B, 5, 0)
  np.testing.assert_array_equal(again.block(1).images, block1.images)
  other = multinet_experiments.DigitStream(images, labels, T, B, 5, 1)
  assert not np.array_equal(other.indices(1), idx1)


# ---------------------------------------------------------------------------
# Recurrent batch normalisation.
# ---------------------------------------------------------------------------

def test_batch_norm_per_time_step_and_running_averages():
  config = _config('dni')
  rng = np.random.default_rng(0)
  scale = np.array([1.0, 10.0, 0.1], np.float32)[None, :, None]
  x = jnp.asarray(rng.normal(size=(16, 3, 4)).astype(np.float32) * scale + 3)
  gamma = jnp.full((4,), 0.1, jnp.float32)
  running = {'mean': jnp.zeros((4,)), 'var': jnp.ones((4,))}
  y, (mean, var) = multinet.batch_norm(config, x, gamma, None, running, True)
  # Every time step is normalised with its own batch statistics.
  np.testing.assert_allclose(jnp.mean(y, axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, axis=0), 0.1, rtol=1e-3)
  chex.assert_shape((mean, var), (3, 4))
  new = multinet.update_running(config, running, (mean, var))
  decay = 0.99 ** 3
  np.testing.assert_allclose(new['mean'], (1 - decay) * jnp.mean(mean, 0),
                             **TOL)
  np.testing.assert_allclose(new['var'],
                             decay + (1 - decay) * jnp.mean(var, 0), **TOL)
  # At test time the running averages are used, not the batch's.
  y_eval, _ = multinet.batch_norm(config, x, gamma, None, new, False)
  expected = ((x - new['mean'].reshape(1, 1, 4))
              / jnp.sqrt(new['var'].reshape(1, 1, 4) + 1e-5) * 0.1)
  np.testing.assert_allclose(y_eval, expected, **TOL)


def test_bn_lstm_init_follows_cooijmans():
  config = _config('dni')
  params, stats = multinet.init_bn_lstm(config, jax.random.key(0), 5)
  for name in ('gamma_x', 'gamma_h', 'gamma_c'):   # gamma init 0.1.
    np.testing.assert_array_equal(params[name], np.float32(0.1))
  np.testing.assert_array_equal(params['beta_c'], 0.0)
  np.testing.assert_array_equal(params['b'][H:2 * H], 1.0)   # Forget gate.
  np.testing.assert_array_equal(params['b'][:H], 0.0)
  chex.assert_shape((stats['x']['mean'], stats['h']['var']), (4 * H,))
  chex.assert_shape(stats['c']['mean'], (H,))


# ---------------------------------------------------------------------------
# The three modes.
# ---------------------------------------------------------------------------

def _warm_states(config, blocks=1):
  """States with non-zero carries, BN averages and Adam moments."""
  net = multinet.make_multinet(config)
  state_a, state_b = net.init(jax.random.key(0), B)
  previous = None
  for k in range(blocks):
    block, previous = _block(k, previous)
    state_a, state_b, _ = net.joint_step(state_a, state_b, block)
  return state_a, state_b, previous


_A_UPDATE = jax.jit(functools.partial(multinet.a_update, _config('backprop')))


@pytest.mark.slow
def test_oracle_synthetic_gradient_a_update_equals_backprop():
  """With the true message gradients that B's update returns as the message
  gradient, A's decoupled update over the T^2 steps of a backprop update (its
  K = T messages) equals backprop's A update, and B's own update equals
  backprop's B update."""
  config = _config('backprop')
  state_a, state_b, previous = _warm_states(config)
  block, _ = _block(7, previous)
  bp_a, bp_b, bp_metrics = multinet.make_multinet(config).joint_step(
      _copy(state_a), _copy(state_b), block)
  # A's update without B's gradient also gives the messages A sends.
  no_b, messages0, _ = _A_UPDATE(state_a, block.images, block.a_targets,
                                 jnp.zeros((B, T, config.message_size)))
  b_step = multinet.make_multinet(_config('decoupled')).b_step  # B without M.
  new_b, true_grad, b_metrics = b_step(_copy(state_b), messages0,
                                       block.b_targets)
  chex.assert_shape(true_grad, (B, T, config.message_size))
  assert float(jnp.max(jnp.abs(true_grad))) > 1e-4
  new_a, messages, a_metrics = _A_UPDATE(state_a, block.images,
                                         block.a_targets, true_grad)
  # Adam's moments hold the gradients: equal for every parameter.
  chex.assert_trees_all_close(new_a.opt_state, bp_a.opt_state, atol=1e-6,
                              rtol=1e-5)
  # The message BN's beta has a zero true gradient (B's input BN removes any
  # shift of the message over the batch): both gradients are rounding noise,
  # which Adam's normalisation turns into full steps, so its update is only
  # compared through the moments above.
  beta = lambda p: {**p, 'message': {**p['message'], 'beta': None}}
  chex.assert_trees_all_close(beta(new_a.params), beta(bp_a.params), **TOL)
  chex.assert_trees_all_close(new_a.bn_stats, bp_a.bn_stats, **TOL)
  chex.assert_trees_all_close(new_a.carry, bp_a.carry, **TOL)
  chex.assert_trees_all_close(new_b.params, bp_b.params, **TOL)
  np.testing.assert_allclose(messages, messages0, **TOL)
  np.testing.assert_allclose(a_metrics['loss'], bp_metrics['a_loss'], **TOL)
  np.testing.assert_allclose(b_metrics['loss'], bp_metrics['b_loss'], **TOL)
  # And the update really depends on B: without B's gradient it differs.
  assert not np.allclose(no_b.params['message']['w'],
                         bp_a.params['message']['w'], **TOL)


def _run(config, blocks, key_b=0):
  """`blocks` blocks of training; A from key 0, B from `key_b`."""
  net = multinet.make_multinet(config)
  state_a, _ = net.init(jax.random.key(0), B)
  _, state_b = net.init(jax.random.key(key_b), B)
  initial_a = _copy(state_a)
  previous = None
  for k in range(blocks):
    block, previous = _block(k, previous)
    state_a, state_b, metrics = net.train_block(state_a, state_b, block)
  return initial_a, state_a, state_b, metrics


def test_decoupled_passes_exactly_zero_gradient_into_a():
  config = _config('decoupled')
  initial_a, state_a, state_b, metrics = _run(config, blocks=2)
  # The message layer only feeds B: its gradient, Adam moments and update
  # are exactly zero; everything else of A did train.
  chex.assert_trees_all_equal(state_a.params['message'],
                              initial_a.params['message'])
  mu = state_a.opt_state['message'][0].mu   # The message layer's own Adam.
  for leaf in jax.tree.leaves(mu):
    assert not np.any(np.asarray(leaf))
  assert not np.allclose(state_a.params['core']['w_h'],
                         initial_a.params['core']['w_h'])
  # A is the same whatever B is: nothing of B reaches it.
  _, state_a_other_b, state_b_other, _ = _run(config, blocks=2, key_b=1)
  assert not np.allclose(state_b_other.params['core']['w_x'],
                         state_b.params['core']['w_x'])
  chex.assert_trees_all_equal(state_a_other_b.params, state_a.params)
  chex.assert_trees_all_equal(state_a_other_b.bn_stats, state_a.bn_stats)
  assert np.isfinite(float(metrics['b_loss']))


@pytest.mark.slow
def test_dni_zero_initialised_m_then_synthetic_gradients_flow():
  dni, dec = _config('dni'), _config('decoupled')
  net_dni = multinet.make_multinet(dni)
  state_a, state_b = net_dni.init(jax.random.key(0), B)
  block, _ = _block(0)
  images, targets = block.images[:, :T], block.a_targets[:, :1]
  # A.1: M's last layer starts at zero, so the first DNI update is the
  # decoupled one, exactly.
  a_step_dec = multinet.make_multinet(dec).a_step
  a_dni, msg, metrics = net_dni.a_step(_copy(state_a), state_b.params['sg'],
                                       images, targets)
  a_dec, _, _ = a_step_dec(_copy(state_a), None, images, targets)
  chex.assert_trees_all_equal(a_dni.params, a_dec.params)
  assert float(metrics['message_grad_norm']) == 0.0
  # B trains M on the messages A sent, towards B's true gradients.
  messages = jnp.concatenate([msg] * T, axis=1)
  b_new, true_grad, b_metrics = net_dni.b_step(
      _copy(state_b), messages, block.b_targets)
  np.testing.assert_allclose(b_metrics['sg_loss'], jnp.mean(jnp.sum(
      jnp.square(true_grad), axis=-1)), rtol=1e-5)   # M(m) = 0 still.
  assert float(b_metrics['sg_cosine']) == 0.0
  # With a trained M, A's message gets sg_scale * M(m), non-zero.
  a_dni2, _, metrics2 = net_dni.a_step(
      _copy(state_a), b_new.params['sg'], images, targets)
  expected = dni.sg_scale * multinet.sg_model_apply(b_new.params['sg'], msg)
  np.testing.assert_allclose(
      metrics2['message_grad_norm'],
      jnp.sqrt(jnp.mean(jnp.sum(jnp.square(expected), axis=-1))), rtol=1e-4)
  assert float(metrics2['message_grad_norm']) > 0
  assert not np.allclose(a_dni2.params['message']['w'],
                         a_dec.params['message']['w'])


@pytest.mark.parametrize('mode,a_per_block,b_per_block',
                         [('dni', T, 1), ('backprop', 1, 1)])
def test_update_counts(mode, a_per_block, b_per_block):
  _, state_a, state_b, _ = _run(_config(mode), blocks=3)
  assert int(state_a.updates) == 3 * a_per_block
  assert int(state_b.updates) == 3 * b_per_block
  if mode == 'dni':   # A updates T times as often as B over the same steps.
    assert int(state_a.updates) == T * int(state_b.updates)


def test_config_validation():
  with pytest.raises(ValueError, match="mode='sgd'"):
    multinet.make_multinet(_config('dni')._replace(mode='sgd'))
  with pytest.raises(ValueError, match='tick=0'):
    multinet.make_multinet(_config('dni')._replace(tick=0))


# ---------------------------------------------------------------------------
# The experiment and the script.
# ---------------------------------------------------------------------------

_TINY = dict(tick=T, hidden_size=H, batch_size=B, num_steps=16, eval_every=8,
             log_every=4, checkpoint_every=8, eval_streams=B, eval_blocks=2,
             learning_rate=LR)


@pytest.mark.slow
def test_workdir_contract_and_exact_resume(tmp_path):
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 64, 32)
  workdir = str(tmp_path / 'run')
  exp = multinet_experiments.MultinetExperiment(
      workdir=workdir, data_dir=data_dir, mode='dni', **_TINY)
  assert exp.model_config() == _config('dni')   # Flags map onto the model.
  result = multinet_experiments.train_multinet(exp)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['mode'] == 'dni' and config['sg_scale'] == 10.0
  assert config['tick'] == 2 and config['learning_rate'] == 1e-3
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [8, 16]
  for row in rows:
    assert 0 <= row['a_test_error'] <= 100 and 0 <= row['b_test_error'] <= 100
  assert [(r['a_updates'], r['b_updates']) for r in rows] == [(4, 2), (8, 4)]
  assert all(-1 <= r['sg_cosine'] <= 1 for r in rows)
  with open(os.path.join(workdir, 'result.json')) as f:
    saved = json.load(f)
  assert saved == result
  assert (result['a_updates'], result['b_updates']) == (8, 4)
  for key in ('a_test_error', 'b_test_error', 'best_a_test_error',
              'best_b_test_error', 'best_a_step', 'best_b_step'):
    assert key in result
  assert result['best_a_test_error'] == min(r['a_test_error'] for r in rows)

  # Resume: drop the last checkpoint and the result; the rerun restarts from
  # step 8 and reproduces the uninterrupted run exactly.
  os.remove(os.path.join(workdir, 'result.json'))
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '16'))
  again = multinet_experiments.train_multinet(exp)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows_again = [json.loads(line) for line in f]
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'train_time'}
                      for r in rs]
  assert strip(rows_again) == strip(rows)
  assert {k: v for k, v in again.items() if 'time' not in k
          and k != 'steps_per_sec'} == {
              k: v for k, v in result.items() if 'time' not in k
              and k != 'steps_per_sec'}

  # A different configuration is refused, naming what differs.
  with pytest.raises(ValueError, match='differs in: learning_rate'):
    multinet_experiments.train_multinet(
        multinet_experiments.MultinetExperiment(
            workdir=workdir, data_dir=data_dir, mode='dni',
            **{**_TINY, 'learning_rate': 1e-2}))


@pytest.mark.parametrize('kwargs,message', [
    (dict(mode='dni', num_steps=10), '--num_steps=10: must be a multiple of '
     'tick^2 = 4'),
    (dict(mode='decoupled', sg_scale=5.0), '--sg_scale needs synthetic '
     'gradients'),
    (dict(mode='dni', batch_size=1), '--batch_size=1'),
    (dict(mode='dni', data_dir=None), '--data_dir is required'),
])
def test_experiment_rejects_bad_settings(kwargs, message):
  settings = {**_TINY, 'workdir': '/nonexistent/w', 'data_dir': '/d',
              **kwargs}
  with pytest.raises(ValueError, match=message.replace('^', '\\^')):
    multinet_experiments.MultinetExperiment(**settings)


@functools.lru_cache(maxsize=None)
def _script_module():
  return conftest.load_script('train_multinet')


def _script_main(*args):
  """scripts/train_multinet.py's absl main, in this process (so it reuses the
  tests' compiled functions)."""
  conftest.run_main(_script_module(), *args, info_logs=True)


@pytest.mark.slow
def test_script_runs_and_reports_bad_flags(tmp_path, capsys, caplog):
  """A tiny run through the script's main (progress lines, result.json);
  a missing data file and a bad flag give one error line and no workdir."""
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 64, 32)
  flags = [f'--{k}={v}' for k, v in _TINY.items()]
  workdir = str(tmp_path / 'dni')
  absl_logger = logging.get_absl_logger()
  absl_logger.addHandler(caplog.handler)
  try:
    _script_main('--mode=dni', f'--data_dir={data_dir}',
                 f'--workdir={workdir}', *flags)
  finally:
    absl_logger.removeHandler(caplog.handler)
  assert 'steps/s' in caplog.text and 'ETA' in caplog.text
  assert 'updates A 8 B 4' in capsys.readouterr().out
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  assert (result['a_updates'], result['b_updates']) == (8, 4)
  assert result['mode'] == 'dni'
  # Bad files: one error line naming the file, exit 1, no workdir.
  bad = str(tmp_path / 'bad')
  os.remove(os.path.join(data_dir, 't10k-labels-idx1-ubyte.gz'))
  with pytest.raises(SystemExit) as exit_info:
    _script_main('--mode=dni', f'--data_dir={data_dir}', f'--workdir={bad}',
                 *flags)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('train_multinet.py: error:')
  assert 't10k-labels-idx1-ubyte' in err[0]
  assert not os.path.exists(bad)
  # Bad flags, from the command line.
  proc = subprocess.run(
      [sys.executable, SCRIPT, '--mode=dni', '--num_steps=10',
       f'--data_dir={data_dir}', f'--workdir={bad}'],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'train_multinet.py: error: --num_steps=10: must be a multiple of '
      'tick^2 = 16 (the loop advances one block of tick^2 steps at a time)')
  assert not os.path.exists(bad)


@pytest.fixture(autouse=True, scope='module')
def _restore_absl_state():
  with conftest.absl_state_restored():
    yield
    _script_module.cache_clear()

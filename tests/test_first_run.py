"""What a first-time user meets: the paper's synthetic-gradient model per
method, the public API in help(dni_jax), PTB evaluation streams independent of
the training batch, and in every harness (feed-forward, recurrent, multinet) a
TensorBoard view of metrics.jsonl and the elapsed training time in every row."""

import glob
import json
import os
import pydoc
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import conftest
import dni_jax
from dni_jax import experiments
from dni_jax import multinet_experiments
from dni_jax import recurrent
from dni_jax import rnn_experiments
from dni_jax import rnn_task_drivers
from dni_jax import training
from dni_jax.training import loop as training_loop
from dni_jax.data import ptb


# ---------------------------------------------------------------------------
# The synthetic-gradient model's depth (A.1).
# ---------------------------------------------------------------------------

def _num_dense_layers(params) -> int:
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(1 for path, _ in paths if path[-1].key == 'kernel')


@pytest.mark.parametrize('kw,hidden_layers', [
    (dict(method='dni'), 2),                      # A.1 MNIST FCN, DNI.
    (dict(method='cdni'), 0),                     # A.1 MNIST FCN, cDNI: linear.
    (dict(method='dni', model='cnn'), 2),         # A.1 CNNs: two conv layers.
    (dict(method='cdni', model='cnn'), 2),
    (dict(method='dni', synthetic_inputs=True), 1),   # A.1 complete unlock.
    (dict(method='cdni', synthetic_inputs=True), 1),
    (dict(method='cdni', sg_hidden_layers=2), 2),     # Explicit wins.
    (dict(method='dni', sg_hidden_layers=0), 0),
])
def test_synthetic_gradient_model_depth_follows_the_paper(kw, hidden_layers):
  config = dni_jax.FeedForwardConfig(input_shape=(6, 6, 1), num_layers=2,
                                     hidden_size=4, sg_hidden_size=4, **kw)
  state = dni_jax.make_feedforward(config, jit=False).init(jax.random.key(0))
  # Hidden layers plus the final (zero-initialised) layer of M.
  assert _num_dense_layers(state.synthetic[0].params) == hidden_layers + 1
  # train_ff.py resolves the same default for the same flags.
  exp = experiments.FeedForwardExperiment(
      workdir='unused', **{k: v for k, v in kw.items()})
  assert exp.resolved_sg_hidden_layers == hidden_layers


# ---------------------------------------------------------------------------
# help(dni_jax).
# ---------------------------------------------------------------------------

def test_help_lists_the_public_classes_and_functions():
  text = pydoc.render_doc(dni_jax, renderer=pydoc.plaintext)
  for name in ('FeedForwardConfig', 'FeedForwardState', 'make_feedforward',
               'per_layer_train_step', 'load_dataset', 'Dataset',
               'RecurrentConfig', 'make_recurrent', 'MultinetConfig',
               'make_multinet', 'make_data_parallel', 'make_pipeline',
               'make_device_pipeline', 'pull_back'):
    assert name in dni_jax.__all__, name
    # An entry of its own (a class or a signature), not a mention.
    assert re.search(rf'^\s+(class )?{name}\(', text, re.M), name
  for name in dni_jax.__all__:
    obj = getattr(dni_jax, name)
    if isinstance(obj, type) or callable(obj):   # Re-exports only.
      assert obj.__module__.startswith('dni_jax.'), name


# ---------------------------------------------------------------------------
# PTB evaluation streams.
# ---------------------------------------------------------------------------

def _write_ptb(directory):
  rng = np.random.default_rng(0)
  words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'dog', 'ate', 'N']
  os.makedirs(directory, exist_ok=True)
  for split, num in zip(ptb.SPLITS, (60, 180, 12)):
    text = ''.join(' ' + ' '.join(rng.choice(words, size=4)) + ' \n'
                   for _ in range(num))
    with open(os.path.join(directory, f'ptb.char.{split}.txt'), 'w') as f:
      f.write(ptb.symbols_to_char_file(ptb.words_to_symbols(text)))
  return str(directory)


def test_ptb_evaluation_uses_its_own_streams_whatever_the_batch(tmp_path):
  data_dir = _write_ptb(tmp_path / 'ptb')
  rows = 3   # The validation text fills 3 rows of 2 segments (1000 chars).
  bpc, params = {}, None
  for batch_size in (2, 8):
    exp = rnn_experiments.RecurrentExperiment(
        workdir=str(tmp_path / 'unused'), task='ptb', data_dir=data_dir,
        hidden_size=8, unroll=3, batch_size=batch_size, eval_rows=rows)
    task = rnn_task_drivers.PtbTask(exp)
    rec = recurrent.make_recurrent(exp.model_config(*task.sizes()))
    if params is None:
      params = rec.init(jax.random.key(1), batch_size,
                        jnp.asarray(task.example_inputs())).params
    bpc[batch_size] = task.bpc(rec, params, 'valid')
  assert bpc[2] == bpc[8]   # Bit-identical: the batch size plays no part.
  # Reference: the validation text cut into `rows` contiguous pieces (of
  # ceil(n / rows) characters, rounded up to whole evaluation segments; the
  # last rows padded or empty), each scored in one pass from a zero state,
  # every next character once.
  ids = task.data['valid'].ids
  n = ids.shape[0] - 1
  segment = rnn_task_drivers.PtbTask.SEGMENT
  per_row = -(-n // rows)                       # ceil(n / rows)
  length = -(-per_row // segment) * segment     # whole segments
  loss, count = 0.0, 0.0
  for start in range(0, n, length):
    stop = min(start + length, n)
    x, y = ids[start:stop][None], ids[start + 1:stop + 1][None]
    resets = np.zeros(x.shape, np.float32)
    resets[0, 0] = 1.0
    _, sums = rec.evaluate_chunk(params, recurrent.zero_state(rec.config, 1),
                                 recurrent.Chunk(x, y, np.ones(x.shape,
                                                               np.float32),
                                                 resets))
    loss += float(sums['loss_sum'])
    count += float(sums['count'])
  assert count == n and 2000 < n <= 3000
  assert bpc[2] == pytest.approx(loss / count / np.log(2.0), rel=1e-5)


def test_copy_evaluation_uses_its_own_episodes_whatever_the_batch():
  """The curriculum check runs `eval_episodes` fresh episodes (default
  256, A.3's batch) whatever the training batch size is: the same number of
  streams and the same bits error, bit for bit, at batch sizes 2 and 8."""
  bits, streams, params = {}, {}, None
  for batch_size in (2, 8):
    exp = rnn_experiments.RecurrentExperiment(
        workdir='unused', task='repeat_copy', core='rnn', hidden_size=8,
        unroll=3, batch_size=batch_size)
    task = rnn_task_drivers.CopyTask(exp)
    rec = recurrent.make_recurrent(exp.model_config(*task.sizes()))
    if params is None:
      params = rec.init(jax.random.key(1), batch_size,
                        jnp.asarray(task.example_inputs())).params
    def evaluate_chunk(p, state0, chunk, rec=rec, batch_size=batch_size):
      streams[batch_size] = chunk.mask.shape[0]
      return rec.evaluate_chunk(p, state0, chunk)
    bits[batch_size] = task.evaluate(
        rec._replace(evaluate_chunk=evaluate_chunk), params)['bits_error']
  assert streams == {2: 256, 8: 256}
  assert bits[2] == bits[8] and bits[2] > 0


@pytest.mark.parametrize('batch_size', [16, 256])
def test_ptb_eval_streams_default_does_not_follow_the_batch(batch_size):
  exp = rnn_experiments.RecurrentExperiment(workdir='unused', task='ptb',
                                            batch_size=batch_size)
  assert exp.resolved['eval_rows'] == 64
  with pytest.raises(ValueError, match='--eval_rows=0'):
    rnn_experiments.RecurrentExperiment(workdir='unused', task='ptb',
                                        eval_rows=0)


# ---------------------------------------------------------------------------
# TensorBoard and elapsed training time, every harness.
# ---------------------------------------------------------------------------

def _read_events(logdir):
  """Every Event of every event file, files in name order (as TensorBoard
  reads them); the TFRecord framing parsed here, CRCs skipped."""
  events = []
  paths = sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*')))
  for path in paths:
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      pos += 12   # Length and its CRC.
      events.append(event_pb2.Event.FromString(data[pos:pos + length]))
      pos += length + 4   # Data and its CRC.
  return events, paths


def _tensorboard_points(workdir):
  """[(step, {tag: value})] as TensorBoard shows them: a restart marker
  (SessionLog START at step s) drops earlier points at steps >= s."""
  points = []
  events, paths = _read_events(os.path.join(workdir, 'tensorboard'))
  for event in events:
    if (event.HasField('session_log')
        and event.session_log.status == event_pb2.SessionLog.START):
      points = [(step, v) for step, v in points if step < event.step]
    elif event.HasField('summary'):
      points.append((event.step, {v.tag: v.simple_value
                                  for v in event.summary.value}))
  return points, paths


def _expected_points(rows):
  """metrics.jsonl rows as float32 scalars: numbers under their name, lists
  one scalar per interface (name/1, name/2, ...); booleans left out."""
  expected = []
  for row in rows:
    scalars = {}
    for key, value in row.items():
      if key == 'step' or isinstance(value, bool):
        continue
      if isinstance(value, list):
        scalars.update({f'{key}/{i + 1}': float(np.float32(v))
                        for i, v in enumerate(value)})
      elif isinstance(value, (int, float)):
        scalars[key] = float(np.float32(value))
    expected.append((row['step'], scalars))
  return expected


def _check_tensorboard_and_time(workdir):
  rows = training.read_metrics(workdir)
  assert rows
  points, paths = _tensorboard_points(workdir)
  assert points == _expected_points(rows)
  times = [row['train_time'] for row in rows]
  assert all(t > 0 for t in times) and times == sorted(times)
  return rows, paths


class _Clock:
  """perf_counter for training.run_loop (training/loop.py): 1 s per call."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    self.now += 1.0
    return self.now


def _ff_experiment(workdir, data_dir):
  return experiments.FeedForwardExperiment(
      workdir=str(workdir), dataset='mnist', data_dir=data_dir, num_layers=3,
      hidden_size=8, method='cdni', sg_hidden_size=8, learning_rate=3e-3,
      lr_boundaries=(), batch_size=16, num_steps=20, eval_every=5,
      log_every=5, checkpoint_every=10)


def test_feed_forward_tensorboard_and_cumulative_train_time(tmp_path,
                                                            monkeypatch):
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 64, 32)
  # Each log point adds one clock second, so train_time counts log points.
  monkeypatch.setattr(training_loop, 'time', _Clock())
  full = _ff_experiment(tmp_path / 'full', data_dir)
  experiments.train_feedforward(full)
  rows, _ = _check_tensorboard_and_time(full.workdir)
  assert [(r['step'], r['train_time']) for r in rows] == [
      (5, 1.0), (10, 2.0), (15, 3.0), (20, 4.0)]

  # Killed after step 18 (rows 5, 10, 15 written, checkpoint at 10), then
  # rerun: row 15 is written again; TensorBoard must show it once, and the
  # training time goes on from the checkpoint's.
  monkeypatch.setattr(training_loop, 'time', _Clock())
  crashed = _ff_experiment(tmp_path / 'crashed', data_dir)
  real_make = dni_jax.feedforward.make_feedforward
  calls = {'n': 0}
  def make_crashing(config, **kw):
    ff = real_make(config, **kw)
    def step(state, images, labels):
      calls['n'] += 1
      if calls['n'] > 18:
        raise KeyboardInterrupt('simulated kill')
      return ff.train_step(state, images, labels)
    return ff._replace(train_step=step)
  monkeypatch.setattr(dni_jax.feedforward, 'make_feedforward', make_crashing)
  with pytest.raises(KeyboardInterrupt):
    experiments.train_feedforward(crashed)
  assert [r['step'] for r in training.read_metrics(crashed.workdir)] == [
      5, 10, 15]
  monkeypatch.setattr(dni_jax.feedforward, 'make_feedforward', real_make)
  experiments.train_feedforward(crashed)
  resumed, paths = _check_tensorboard_and_time(crashed.workdir)
  assert len(paths) == 2
  assert resumed == rows


def test_recurrent_tensorboard_train_time_and_progress_line(tmp_path, caplog):
  exp = rnn_experiments.RecurrentExperiment(
      workdir=str(tmp_path / 'run'), task='copy', hidden_size=8, unroll=2,
      method='dni', learning_rate=1e-2, batch_size=4, num_steps=6,
      eval_every=2, log_every=1, checkpoint_every=3)
  with caplog.at_level('INFO'):
    rnn_experiments.train_recurrent(exp)
  rows, _ = _check_tensorboard_and_time(exp.workdir)
  assert [r['step'] for r in rows] == [2, 4, 6]
  assert 'step 6/6' in caplog.text and 'steps/s' in caplog.text
  assert 'ETA' in caplog.text


def test_multinet_tensorboard_and_train_time(tmp_path):
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 64, 32)
  exp = multinet_experiments.MultinetExperiment(
      workdir=str(tmp_path / 'run'), data_dir=data_dir, mode='dni', tick=2,
      hidden_size=8, batch_size=4, num_steps=8, eval_every=4, log_every=4,
      checkpoint_every=8, eval_streams=4, eval_blocks=1, learning_rate=1e-3)
  multinet_experiments.train_multinet(exp)
  rows, _ = _check_tensorboard_and_time(exp.workdir)
  assert [r['step'] for r in rows] == [4, 8]
  assert 'sg_cosine' in rows[0]


def test_tensorboard_gets_the_history_of_a_run_started_without_it(tmp_path):
  """A workdir whose metrics.jsonl predates its tensorboard/ folder: resuming
  writes the kept rows first, so TensorBoard shows the whole run."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  old = [{'step': 5, 'train_loss': 2.5, 'sg_loss': [0.25, 0.5]},
         {'step': 10, 'train_loss': 1.5, 'sg_loss': [0.125, 0.25]},
         {'step': 15, 'train_loss': 1.0, 'sg_loss': [0.0625, 0.125]}]
  (workdir / 'metrics.jsonl').write_text(
      ''.join(json.dumps(row) + '\n' for row in old))
  log = training.MetricsLog(str(workdir), keep_up_to_step=10)  # Checkpoint 10.
  log.append({'step': 15, 'train_loss': 0.75, 'sg_loss': [0.5, 1.0]})
  log.close()
  points, _ = _tensorboard_points(str(workdir))
  assert points == _expected_points(training.read_metrics(str(workdir)))
  assert [step for step, _ in points] == [5, 10, 15]
  assert points[-1][1] == {'train_loss': 0.75, 'sg_loss/1': 0.5,
                           'sg_loss/2': 1.0}

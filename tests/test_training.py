"""The workdir contract, resume, guards and the train_ff.py script."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import dni_jax
from dni_jax import experiments
from dni_jax import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FF = os.path.join(REPO, 'scripts', 'train_ff.py')


# Twice the width and length of the workdir tests' experiment.
tiny_experiment = functools.partial(conftest.tiny_ff_experiment, hidden_size=32,
                                    sg_hidden_size=32, num_steps=20)


def read_lines(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def run_script(*args):
  return subprocess.run([sys.executable, TRAIN_FF, *args], capture_output=True,
                        text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_script_writes_the_workdir_contract_and_learns(tmp_path, mnist_dir):
  workdir = tmp_path / 'run'
  proc = run_script(f'--workdir={workdir}', '--dataset=mnist',
                    f'--data_dir={mnist_dir}', '--method=dni',
                    '--num_layers=3', '--hidden_size=32', '--sg_hidden_size=32',
                    '--learning_rate=3e-3', '--lr_boundaries=', '--batch_size=32',
                    '--num_steps=60', '--eval_every=20', '--log_every=10',
                    '--checkpoint_every=30')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'steps/s' in proc.stderr and 'ETA' in proc.stderr
  config = json.loads((workdir / 'config.json').read_text())
  assert config['method'] == 'dni' and config['num_steps'] == 60
  assert config['sg_hidden_layers'] == 2     # A.1 default for DNI, resolved.
  assert config['lr_boundaries'] == []
  rows = read_lines(workdir / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [20, 40, 60]
  for r in rows:
    assert {'step', 'train_loss', 'test_error', 'test_loss', 'sg_loss',
            'sg_l2_error', 'sg_cosine', 'sg_sign_error'} <= set(r)
    for key in ('sg_loss', 'sg_l2_error', 'sg_cosine', 'sg_sign_error'):
      assert len(r[key]) == 2                # 3 layers: 2 DNIs.
    assert all(-1 <= c <= 1 for c in r['sg_cosine'])
  result = json.loads((workdir / 'result.json').read_text())
  for key in ('test_error', 'best_test_error', 'num_steps', 'steps_per_sec'):
    assert key in result
  assert result['test_error'] == rows[-1]['test_error']
  assert result['test_error'] < 30.0         # Chance is 90%.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['30', '60']


@pytest.mark.slow
@pytest.mark.parametrize('args, needle', [
    (['--num_layers=1'], '--num_layers=1'),
    (['--learning_rate=0'], '--learning_rate=0.0'),
    (['--lr_boundaries=5,x'], '--lr_boundaries=5,x'),
    (['--sg_hidden_layers=3'], '--sg_hidden_layers=3'),
    (['--data_dir=/nonexistent/mnist'], '/nonexistent/mnist'),
    (['--dni_layers=4'], '--dni_layers=4'),
    (['--method=bprop', '--dni_layers=1'], '--method=bprop has no interfaces'),
    (['--p_update=0'], '--p_update=0.0'),
    (['--method=bprop', '--synthetic_inputs'], '--synthetic_inputs needs'),
    (['--model=cnn', '--synthetic_inputs'], '--model=fcn only'),
    (['--method=bprop', '--p_update=0.5'], '--p_update < 1 needs interfaces'),
    (['--method=stale', '--stale_decay=1'], '--stale_decay=1.0'),
])
def test_script_bad_input_is_one_clear_line(tmp_path, mnist_dir, args, needle):
  workdir = tmp_path / 'run'
  base = [f'--workdir={workdir}', f'--data_dir={mnist_dir}', '--num_steps=2']
  proc = run_script(*base, *args)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
  assert not (workdir / 'result.json').exists()


@pytest.mark.slow
def test_script_single_dni_writes_one_interface(tmp_path, mnist_dir):
  workdir = tmp_path / 'run'
  proc = run_script(f'--workdir={workdir}', f'--data_dir={mnist_dir}',
                    '--num_layers=4', '--dni_layers=2', '--hidden_size=16',
                    '--sg_hidden_size=16', '--batch_size=32', '--num_steps=4',
                    '--eval_every=4')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((workdir / 'config.json').read_text())['dni_layers'] == [2]
  row = read_lines(workdir / 'metrics.jsonl')[-1]
  assert len(row['sg_loss']) == 1 and len(row['sg_cosine']) == 1


@pytest.mark.slow
def test_script_trains_a_cnn_and_records_resolved_sizes(tmp_path, mnist_dir):
  workdir = tmp_path / 'run'
  proc = run_script(f'--workdir={workdir}', f'--data_dir={mnist_dir}',
                    '--model=cnn', '--num_layers=3', '--hidden_size=4',
                    '--method=cdni', '--batch_size=16', '--num_steps=3',
                    '--eval_every=3')
  assert proc.returncode == 0, proc.stderr[-2000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['model'], config['hidden_size'], config['sg_hidden_size'],
          config['sg_hidden_layers']) == ('cnn', 4, 4, 2)
  assert len(read_lines(workdir / 'metrics.jsonl')[-1]['sg_cosine']) == 2


@pytest.mark.slow
def test_script_complete_unlock_records_input_model_losses(tmp_path,
                                                           mnist_dir):
  workdir = tmp_path / 'run'
  proc = run_script(f'--workdir={workdir}', f'--data_dir={mnist_dir}',
                    '--synthetic_inputs', '--p_update=0.5', '--num_layers=3',
                    '--hidden_size=16', '--sg_hidden_size=16',
                    '--batch_size=16', '--num_steps=4', '--eval_every=4')
  assert proc.returncode == 0, proc.stderr[-2000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert config['synthetic_inputs'] and config['sg_hidden_layers'] == 1
  row = read_lines(workdir / 'metrics.jsonl')[-1]
  assert 'test_error' in row and len(row['si_loss']) == 2


@pytest.mark.slow
def test_script_requires_workdir(mnist_dir):
  proc = run_script(f'--data_dir={mnist_dir}')
  assert proc.returncode == 1 and '--workdir is required' in proc.stderr


def _interrupting(train_step, at_step):
  calls = {'n': 0}
  def step(state, images, labels):
    calls['n'] += 1
    if calls['n'] > at_step:
      raise KeyboardInterrupt('simulated crash')
    return train_step(state, images, labels)
  return step


@pytest.mark.slow
def test_resume_after_crash_reproduces_uninterrupted_run(tmp_path, mnist_dir,
                                                         monkeypatch, caplog):
  full = tiny_experiment(tmp_path / 'full', mnist_dir)
  experiments.train_feedforward(full)

  crashed = tiny_experiment(tmp_path / 'crashed', mnist_dir)
  real_make = dni_jax.feedforward.make_feedforward
  def make_crashing(config, **kw):
    ff = real_make(config, **kw)
    return ff._replace(train_step=_interrupting(ff.train_step, 13))
  monkeypatch.setattr(dni_jax.feedforward, 'make_feedforward', make_crashing)
  with pytest.raises(KeyboardInterrupt):
    experiments.train_feedforward(crashed)
  monkeypatch.undo()
  assert not (tmp_path / 'crashed' / 'result.json').exists()
  assert [r['step'] for r in read_lines(tmp_path / 'crashed' /
                                        'metrics.jsonl')] == [5, 10]
  with caplog.at_level('INFO'):
    experiments.train_feedforward(crashed)
  assert any('resumed from' in r.getMessage() and r.getMessage().endswith('/10')
             for r in caplog.records)
  untimed = lambda rows: [{k: v for k, v in r.items() if k != 'train_time'}
                          for r in rows]
  assert (untimed(read_lines(tmp_path / 'full' / 'metrics.jsonl'))
          == untimed(read_lines(tmp_path / 'crashed' / 'metrics.jsonl')))


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, mnist_dir):
  exp = tiny_experiment(tmp_path / 'run', mnist_dir, num_steps=10)
  experiments.train_feedforward(exp)
  os.remove(tmp_path / 'run' / 'result.json')   # As if killed at the end.
  latest = tmp_path / 'run' / 'checkpoints' / '10'
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  experiments.train_feedforward(exp)
  assert os.listdir(tmp_path / 'run' / 'checkpoints_unreadable') == ['10']
  assert [r['step'] for r in read_lines(tmp_path / 'run' /
                                        'metrics.jsonl')] == [5, 10]


def test_finished_workdir_is_not_retrained(tmp_path, mnist_dir):
  exp = tiny_experiment(tmp_path / 'run', mnist_dir, num_steps=5)
  first = experiments.train_feedforward(exp)
  mtime = os.path.getmtime(tmp_path / 'run' / 'metrics.jsonl')
  assert experiments.train_feedforward(exp) == first
  assert os.path.getmtime(tmp_path / 'run' / 'metrics.jsonl') == mtime
  # A result.json cut short (say, a full disk) is named, not a traceback.
  (tmp_path / 'run' / 'result.json').write_text('{"test_er')
  with pytest.raises(training.WorkdirError, match='result.json is unreadable'):
    experiments.train_feedforward(exp)


def test_workdir_with_other_config_is_refused_unless_overwrite(tmp_path):
  workdir = str(tmp_path / 'run')
  assert training.prepare_workdir(workdir, {'a': 1, 'b': 2}, False) == 'new'
  assert training.prepare_workdir(workdir, {'a': 1, 'b': 2}, False) == 'resume'
  with pytest.raises(training.WorkdirError, match='differs in: b'):
    training.prepare_workdir(workdir, {'a': 1, 'b': 3}, False)
  (tmp_path / 'run' / 'metrics.jsonl').write_text('{"step": 1}\n')
  assert training.prepare_workdir(workdir, {'a': 1, 'b': 3}, True) == 'new'
  assert sorted(os.listdir(workdir)) == ['config.json']
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(training.WorkdirError, match='not a run of this project'):
    training.prepare_workdir(str(other), {'a': 1}, False)


def _poison(tree):
  return jax.tree.map(lambda x: x * jnp.nan, tree)


@pytest.mark.parametrize('inject, message', [
    ('synthetic', r'synthetic gradient on interface 2 at step 1;'),
    ('layer', r'output of layer 1 at step 1;'),
    ('loss_at_5', r'training loss at step 5;'),
])
def test_non_finite_values_stop_training_naming_step_and_module(
    tmp_path, mnist_dir, inject, message):
  ff = dni_jax.make_feedforward(dni_jax.FeedForwardConfig(
      input_shape=(28, 28, 1), num_layers=3, hidden_size=8, method='cdni',
      sg_hidden_layers=0))
  state = ff.init(jax.random.key(0))
  if inject == 'synthetic':
    sg = state.synthetic[1]
    state = state._replace(synthetic=(state.synthetic[0],
                                      sg._replace(params=_poison(sg.params))))
  elif inject == 'layer':
    layer = state.layers[0]
    state = state._replace(layers=(layer._replace(
        params=_poison(layer.params)),) + state.layers[1:])
  def step(state, images, labels):
    state, metrics = ff.train_step(state, images, labels)
    if inject == 'loss_at_5' and int(state.step) == 5:
      metrics = {**metrics, 'loss': jnp.nan}
    return state, metrics
  data = dni_jax.data.load_dataset('mnist', 'train', mnist_dir)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with pytest.raises(training.TrainingError, match=message):
    training.fit(workdir=str(workdir), loop=training.LoopConfig(
        num_steps=12, eval_every=12, log_every=6, checkpoint_every=4,
        batch_size=32, seed=0), init_state=state,
        train_step=step, eval_batch=ff.eval_batch,
        train_data=(data.images, data.labels),
        test_data=(data.images, data.labels))
  # Nothing non-finite was checkpointed; only a healthy state is kept.
  expected = [] if inject != 'loss_at_5' else ['4']
  assert sorted(os.listdir(workdir / 'checkpoints')) == expected
  assert not (workdir / 'result.json').exists()


def test_epoch_sampler_depends_only_on_seed_and_step():
  a = training.EpochSampler(100, 32, seed=3)
  b = training.EpochSampler(100, 32, seed=3)
  seq = [a.indices(s) for s in range(7)]
  np.testing.assert_array_equal(b.indices(5), seq[5])   # Random access.
  epoch0 = np.concatenate(seq[:3])
  assert len(set(epoch0.tolist())) == 96                # No repeats in an epoch.
  assert not np.array_equal(seq[0], seq[3])             # Reshuffled per epoch.
  with pytest.raises(ValueError, match='batch_size=200'):
    training.EpochSampler(100, 200, seed=0)


def test_tfds_source_trains_end_to_end(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  exp = experiments.FeedForwardExperiment(
      workdir=str(tmp_path / 'run'), dataset='mnist', data_source='tfds',
      data_dir=str(tmp_path / 'tfds'), num_layers=2, hidden_size=8,
      method='cdni', batch_size=8, num_steps=2, eval_every=2, log_every=1,
      checkpoint_every=2)
  with tfds.testing.mock_data(num_examples=16):
    result = experiments.train_feedforward(exp)
  assert result['num_steps'] == 2 and 0 <= result['test_error'] <= 100


TIMING_FIELDS = ('steps_per_sec', 'train_time')


def _outputs(workdir):
  result = json.loads((workdir / 'result.json').read_text())
  rows = read_lines(workdir / 'metrics.jsonl')
  for row_or_result in rows + [result]:
    for key in TIMING_FIELDS:
      row_or_result.pop(key, None)
  return rows, result


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_matches_uninterrupted(tmp_path,
                                                                mnist_dir):
  """A real process killed with SIGKILL mid-run, then resumed by rerunning the
  same command, ends with the same metrics.jsonl and result.json."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  def command(workdir):
    return [sys.executable, TRAIN_FF, f'--workdir={workdir}',
            f'--data_dir={mnist_dir}', '--method=dni', '--num_layers=3',
            '--hidden_size=16', '--sg_hidden_size=16', '--batch_size=16',
            '--learning_rate=1e-3', '--lr_boundaries=150', '--num_steps=300',
            '--eval_every=50', '--log_every=25', '--checkpoint_every=30']
  reference = tmp_path / 'reference'
  subprocess.run(command(reference), check=True, capture_output=True,
                 timeout=300)
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = killed / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'result.json').exists(), 'finished before the kill'
  subprocess.run(command(killed), check=True, capture_output=True, timeout=300)
  assert _outputs(killed) == _outputs(reference)


@pytest.mark.slow
def test_same_seed_same_command_is_bit_identical(tmp_path, mnist_dir):
  a = tiny_experiment(tmp_path / 'a', mnist_dir, method='dni', num_steps=10)
  b = tiny_experiment(tmp_path / 'b', mnist_dir, method='dni', num_steps=10)
  experiments.train_feedforward(a)
  experiments.train_feedforward(b)
  assert _outputs(tmp_path / 'a') == _outputs(tmp_path / 'b')
  c = tiny_experiment(tmp_path / 'c', mnist_dir, method='dni', num_steps=10,
                      seed=1)
  experiments.train_feedforward(c)
  assert _outputs(tmp_path / 'c')[0] != _outputs(tmp_path / 'a')[0]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, mnist_dir):
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  cmd = [sys.executable, TRAIN_FF, f'--workdir={workdir}',
         f'--data_dir={mnist_dir}', '--method=cdni', '--num_layers=3',
         '--hidden_size=16', '--batch_size=16', '--num_steps=100000',
         '--eval_every=50', '--log_every=50', '--checkpoint_every=100000']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists()
                                        and metrics.read_text()):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 1
  assert 'stopped by signal' in stderr and 'rerun the same command' in stderr
  steps = [int(s) for s in os.listdir(workdir / 'checkpoints')]
  assert len(steps) == 1 and 50 <= steps[0] < 100000
  assert not (workdir / 'result.json').exists()


# ---------------------------------------------------------------------------
# The run harness every script shares (training.train), on a toy run.
# ---------------------------------------------------------------------------

def _toy_run(workdir, num_steps, nan_at=None):
  """`training.train` on a counter: each step adds 1 (NaN at step `nan_at`,
  as the loss). Returns result.json's dict."""
  x = None

  def start(payload, start_step):
    nonlocal x
    x = payload['x']
    assert float(x) == start_step   # Restored where the checkpoint was.

    def train_step(step):
      nonlocal x
      x = x + 1.0
      loss = jnp.nan if step + 1 == nan_at else x
      return {'loss': loss, 'other': jnp.ones(2)}

    return training.Hooks(
        train_step=train_step, log_text=lambda fetched: '',
        evaluate_row=lambda step, fetched, seconds: {'x': float(x)},
        payload=lambda seconds: {'x': x})

  return training.train(
      workdir=str(workdir),
      schedule=training.Schedule(num_steps, eval_every=2, log_every=1,
                                 checkpoint_every=2),
      init_payload={'x': jnp.zeros(())}, start=start,
      result=lambda stats, rows: {'x': rows[-1]['x'], 'steps': stats.step},
      finite=('loss',))


def test_harness_restores_logs_and_writes_the_result(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  assert _toy_run(workdir, 4) == {'x': 4.0, 'steps': 4}
  # Extended: resumes from checkpoint 4 (x = 4), the rows go on.
  assert _toy_run(workdir, 6) == {'x': 6.0, 'steps': 6}
  assert [(r['step'], r['x']) for r in read_lines(workdir / 'metrics.jsonl')
          ] == [(2, 2.0), (4, 4.0), (6, 6.0)]
  with open(workdir / 'result.json') as f:
    assert json.load(f) == {'x': 6.0, 'steps': 6}


def test_harness_stops_at_the_first_non_finite_step(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with pytest.raises(training.TrainingError,
                     match='non-finite training loss at step 3; stopped'):
    _toy_run(workdir, 8, nan_at=3)
  # Checkpoint 2 is kept; the unhealthy state (step 4) is never saved.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  assert not (workdir / 'result.json').exists()


# ---------------------------------------------------------------------------
# One vocabulary of method names; scripts build experiments from their flags.
# ---------------------------------------------------------------------------

def test_old_method_names_are_aliases_recorded_as_before():
  from dni_jax import methods  # pylint: disable=g-import-not-at-top
  from dni_jax import multinet_experiments  # pylint: disable=g-import-not-at-top
  from dni_jax import rnn_experiments  # pylint: disable=g-import-not-at-top
  rnn = lambda m: rnn_experiments.RecurrentExperiment(workdir='w', method=m)
  # config.json records the old value for either spelling: workdirs written
  # before resume with the new one, and the other way round.
  assert rnn('bprop').config_record() == rnn('bptt').config_record()
  assert rnn('bprop').config_record()['method'] == 'bptt'
  net = lambda m: multinet_experiments.MultinetExperiment(
      workdir='w', data_dir='/d', mode=m)
  for new, old in (('bprop', 'backprop'), ('no_bprop', 'decoupled')):
    assert net(new).config_record() == net(old).config_record()
    assert net(new).config_record()['mode'] == old
  with pytest.raises(ValueError, match=r'--method=sgd: must be one of bprop, '
                     r'dni, dni_aux \(or the older bptt\)$'):
    rnn('sgd')
  with pytest.raises(ValueError, match='--mode=bptt: must be one of bprop, '
                     'dni, no_bprop'):
    net('bptt')   # Another script's alias is not this one's.
  assert methods.flag_values(('backprop', 'dni', 'decoupled')) == [
      'bprop', 'dni', 'no_bprop', 'backprop', 'decoupled']


@pytest.mark.parametrize('script, args, same_as', [
    ('train_rnn.py', ['--method=bprop'], dict(method='bptt',
                                              num_devices=None)),
    ('train_rnn.py', ['--method=bptt', '--task=copy', '--unroll=3'],
     dict(method='bptt', task='copy', unroll=3, num_devices=None)),
    ('train_multinet.py', ['--data_dir=/d', '--mode=no_bprop'],
     dict(data_dir='/d', mode='decoupled')),
    ('train_multinet.py', ['--data_dir=/d', '--mode=backprop', '--tick=2'],
     dict(data_dir='/d', mode='bprop', tick=2)),
    ('train_ff.py', ['--dni_layers=1', '--lr_boundaries=', '--num_layers=3'],
     dict(dni_layers=(1,), lr_boundaries=(), num_layers=3, num_devices=None)),
    ('train_ff.py', ['--method=bprop', '--lr_boundaries=5,7'],
     dict(method='bprop', lr_boundaries=(5, 7), num_devices=None)),
])
def test_scripts_build_the_experiment_from_flags_of_the_same_names(
    script, args, same_as):
  from dni_jax import multinet_experiments  # pylint: disable=g-import-not-at-top
  from dni_jax import rnn_experiments  # pylint: disable=g-import-not-at-top
  experiment = {'train_ff.py': experiments.FeedForwardExperiment,
                'train_rnn.py': rnn_experiments.RecurrentExperiment,
                'train_multinet.py': multinet_experiments.MultinetExperiment
                }[script]
  with conftest.absl_state_restored():
    module = conftest.load_script(script[:-3])
    module.FLAGS([script, '--workdir=w', *args])
    try:
      exp = module.cli.experiment_from_flags(
          experiment, module.FLAGS,
          config_flag='config' if script == 'train_ff.py' else None)
    finally:
      module.FLAGS.unparse_flags()
  assert exp == experiment(workdir='w', **same_as)


@pytest.mark.parametrize('kind', ['recurrent', 'multinet'])
def test_recurrent_and_multinet_runs_stop_on_a_non_finite_metric(
    tmp_path, monkeypatch, kind):
  """The harness's health check guards every script's run: a NaN metric at
  one step stops it there, and nothing after the last good checkpoint is
  saved."""
  from dni_jax import multinet  # pylint: disable=g-import-not-at-top
  from dni_jax import multinet_experiments  # pylint: disable=g-import-not-at-top
  from dni_jax import recurrent  # pylint: disable=g-import-not-at-top
  from dni_jax import rnn_experiments  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  calls = {'n': 0}
  if kind == 'recurrent':
    real = recurrent.make_recurrent
    def make(config):
      rec = real(config)
      def step(state, chunk):
        calls['n'] += 1
        state, metrics = rec.train_step(state, chunk)
        if calls['n'] == 3:
          metrics = {**metrics, 'aux_loss': jnp.inf}
        return state, metrics
      return rec._replace(train_step=step)
    monkeypatch.setattr(recurrent, 'make_recurrent', make)
    exp = rnn_experiments.RecurrentExperiment(
        workdir=str(workdir), task='copy', hidden_size=8, unroll=2,
        batch_size=4, num_steps=8, eval_every=2, log_every=4,
        checkpoint_every=2)
    run, bad_step, kept = rnn_experiments.train_recurrent, 3, ['2']
  else:
    real = multinet.make_multinet
    def make(config):
      net = real(config)
      def block(state_a, state_b, stream_block):
        calls['n'] += 1
        state_a, state_b, metrics = net.train_block(state_a, state_b,
                                                    stream_block)
        if calls['n'] == 2:
          metrics = {**metrics, 'b_loss': jnp.nan}
        return state_a, state_b, metrics
      return net._replace(train_block=block)
    monkeypatch.setattr(multinet, 'make_multinet', make)
    exp = multinet_experiments.MultinetExperiment(
        workdir=str(workdir),
        data_dir=conftest.write_mnist_like(str(tmp_path / 'mnist'), 64, 32),
        tick=2, hidden_size=8, batch_size=4, num_steps=16, eval_every=4,
        log_every=8, checkpoint_every=4, eval_streams=4, eval_blocks=1)
    run, bad_step, kept = multinet_experiments.train_multinet, 8, ['4']
  with pytest.raises(training.TrainingError,
                     match=f'non-finite .* at step {bad_step}; stopped'):
    run(exp)
  assert sorted(os.listdir(workdir / 'checkpoints')) == kept
  assert not (workdir / 'result.json').exists()


@pytest.mark.parametrize('settings, message', [
    (dict(num_layers=1), '--num_layers=1 must be >= 2'),
    (dict(dni_layers=(2, 1)), '--dni_layers=2,1 must be strictly increasing'),
    (dict(method='bprop', dni_layers=(1,)),
     '--dni_layers is set but --method=bprop has no interfaces'),
    (dict(model='cnn', synthetic_inputs=True),
     '--synthetic_inputs is implemented for --model=fcn only'),
    (dict(method='sgd'), '--method=sgd is not one of'),
    (dict(lr_boundaries=(5, 3)), '--lr_boundaries=5,3 must be positive'),
])
def test_network_settings_are_checked_by_the_config_in_flag_words(
    settings, message):
  """FeedForwardExperiment leaves the network's settings to
  FeedForwardConfig (one check each) and names the flags in its errors."""
  with pytest.raises(ValueError) as info:
    experiments.FeedForwardExperiment(workdir='w', **settings)
  assert str(info.value).startswith(message)

"""Workdir safety: what --overwrite may delete, when anything is written, what
a rerun may change (resume, extend), and one-line errors for unusable
workdirs. In-process and fast; the script-level checks are in
test_script_errors.py."""

import errno
import json
import logging as std_logging
import os
import shutil

from absl import logging
import jax
import numpy as np
import pytest

import conftest
from dni_jax import cli
from dni_jax import experiments
from dni_jax import multinet_experiments
from dni_jax import rnn_experiments
from dni_jax import training
from dni_jax.training import workdir as training_workdir
from dni_jax.data import datasets
from dni_jax.data import tfds_source

THESIS = 'my thesis, not backed up'


tiny = conftest.tiny_ff_experiment


def plant_foreign(folder):
  """A user's file and sub-folder, which no run writes."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'thesis.tex').write_text(THESIS)
  (folder / 'sub').mkdir()
  (folder / 'sub' / 'notes.txt').write_text(THESIS)


def assert_foreign_intact(folder):
  assert (folder / 'thesis.tex').read_text() == THESIS
  assert (folder / 'sub' / 'notes.txt').read_text() == THESIS


def fake_finished_run(workdir, exp):
  """What a finished run leaves, written by hand (no training needed)."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / training.CONFIG_FILE).write_text(json.dumps(exp.config_record()))
  (workdir / training.METRICS_FILE).write_text('{"step": 10}\n')
  (workdir / training.RESULT_FILE).write_text('{"test_error": 12.5}')
  (workdir / training.CHECKPOINT_DIR).mkdir()
  (workdir / training.CHECKPOINT_DIR / 'marker').write_text('ours')
  return {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}


def snapshot(folder):
  return {p: p.read_bytes() for p in folder.rglob('*') if p.is_file()}


# ---------------------------------------------------------------------------
# --overwrite never touches what the program did not write.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('overwrite', [False, True])
@pytest.mark.parametrize('situation', ['good', 'bad_data', 'bad_flag',
                                       'other_config', 'finished'])
@pytest.mark.parametrize('folder', ['not_a_run', 'run_and_foreign'])
def test_foreign_entries_survive_every_flag_combination(
    tmp_path, mnist_dir, folder, situation, overwrite):
  workdir = tmp_path / 'work'
  exp_args = {'overwrite': overwrite}
  data_dir = (str(tmp_path / 'no_such_data') if situation == 'bad_data'
              else mnist_dir)
  if situation == 'other_config':
    exp_args['learning_rate'] = 1e-2
  run_files = {}
  if folder == 'run_and_foreign':
    run_files = fake_finished_run(workdir, tiny(workdir, mnist_dir))
    if situation != 'finished':
      os.remove(workdir / training.RESULT_FILE)
      del run_files[workdir / training.RESULT_FILE]
  plant_foreign(workdir)
  before = snapshot(workdir)

  if situation == 'bad_flag':
    with pytest.raises(ValueError, match='--num_layers=1'):
      experiments.train_feedforward(tiny(workdir, data_dir, num_layers=1,
                                         **exp_args))
  elif folder == 'run_and_foreign' and not overwrite and situation == 'good':
    # The same run resumes whatever else the folder holds (nothing is
    # deleted) and finishes.
    experiments.train_feedforward(tiny(workdir, data_dir, **exp_args))
    assert (workdir / training.RESULT_FILE).exists()
    assert_foreign_intact(workdir)
    return
  elif (folder == 'run_and_foreign' and not overwrite
        and situation == 'finished'):
    result = experiments.train_feedforward(tiny(workdir, data_dir,
                                                **exp_args))
    assert result == {'test_error': 12.5}
  else:
    with pytest.raises(ValueError) as info:
      experiments.train_feedforward(tiny(workdir, data_dir, **exp_args))
    message = str(info.value)
    assert '\n' not in message
    if folder == 'not_a_run' and situation != 'bad_data':
      assert 'not a run of this project' in message
      assert '--overwrite' not in message
    if folder == 'run_and_foreign' and situation != 'bad_data':
      # Never suggests the flag that would be refused.
      assert 'pass --overwrite' not in message
  assert_foreign_intact(workdir)
  assert snapshot(workdir) == before
  for path, content in run_files.items():
    assert path.read_bytes() == content


def test_overwrite_replaces_a_run_deleting_only_run_entries(tmp_path):
  workdir = tmp_path / 'work'
  workdir.mkdir()
  for name in training.RUN_ENTRIES:
    if '.' in name:
      (workdir / name).write_text('old')
    else:
      (workdir / name / 'old').mkdir(parents=True)
  (workdir / training.CONFIG_FILE).write_text('{"a": 1}')
  assert training.check_workdir(str(workdir), {'a': 2}, True) == 'replace'
  assert sorted(os.listdir(workdir)) == sorted(training.RUN_ENTRIES)
  assert training.prepare_workdir(str(workdir), {'a': 2}, True) == 'new'
  assert os.listdir(workdir) == [training.CONFIG_FILE]
  assert json.loads((workdir / training.CONFIG_FILE).read_text()) == {'a': 2}


def test_failed_start_writes_nothing_and_the_corrected_run_starts(
    tmp_path, mnist_dir):
  workdir = tmp_path / 'work'
  with pytest.raises(datasets.DataError, match='no_such_data'):
    experiments.train_feedforward(tiny(workdir, str(tmp_path / 'no_such_data')))
  with pytest.raises(ValueError, match='--batch_size=4096: exceeds the 512'):
    experiments.train_feedforward(tiny(workdir, mnist_dir, batch_size=4096))
  assert not workdir.exists()
  # An existing empty folder stays empty too.
  workdir.mkdir()
  with pytest.raises(datasets.DataError):
    experiments.train_feedforward(tiny(workdir, str(tmp_path / 'nope')))
  assert os.listdir(workdir) == []
  assert training.check_workdir(str(workdir), tiny(
      workdir, mnist_dir).config_record(), False) == 'new'


def test_multinet_writes_nothing_before_its_data_is_read(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  workdir = tmp_path / 'work'
  exp = multinet_experiments.MultinetExperiment(
      workdir=str(workdir), data_dir=str(empty), num_steps=16, tick=2)
  with pytest.raises(datasets.DataError) as info:
    multinet_experiments.train_multinet(exp)
  # train_multinet.py has no --data_source flag: its hint must not name one.
  assert '--data_source' not in str(info.value)
  assert 'https://' in str(info.value)
  assert not workdir.exists()


def test_recurrent_writes_nothing_before_its_data_is_read(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  workdir = tmp_path / 'work'
  exp = rnn_experiments.RecurrentExperiment(
      workdir=str(workdir), task='ptb', data_dir=str(empty), hidden_size=8,
      batch_size=2, num_steps=2)
  with pytest.raises(ValueError, match=str(empty)):
    rnn_experiments.train_recurrent(exp)
  assert not workdir.exists()


# ---------------------------------------------------------------------------
# Resume: what a rerun may change.
# ---------------------------------------------------------------------------

def test_rerun_may_change_reporting_periods_workdir_spelling_and_data_path(
    tmp_path, mnist_dir, monkeypatch):
  workdir = tmp_path / 'work'
  exp = tiny(workdir, mnist_dir)
  assert training.prepare_workdir(str(workdir), exp.config_record(),
                                  False) == 'new'
  rerun = tiny(str(workdir) + '/', mnist_dir + '/', log_every=1,
               eval_every=2, checkpoint_every=3)
  assert training.prepare_workdir(str(workdir), rerun.config_record(),
                                  False) == 'resume'
  # config.json follows the latest invocation.
  saved = json.loads((workdir / training.CONFIG_FILE).read_text())
  assert (saved['log_every'], saved['eval_every'],
          saved['checkpoint_every']) == (1, 2, 3)
  # Relative data path, run from the folder above it.
  monkeypatch.chdir(os.path.dirname(mnist_dir))
  relative = tiny(workdir, os.path.basename(mnist_dir))
  assert training.check_workdir(str(workdir), relative.config_record(),
                                False) == 'resume'
  # A moved workdir resumes too: its own path is not part of the run.
  moved = tmp_path / 'moved'
  shutil.move(str(workdir), str(moved))
  assert training.check_workdir(str(moved), tiny(
      moved, mnist_dir).config_record(), False) == 'resume'
  # A setting that changes the result is refused, naming it.
  with pytest.raises(training.WorkdirError, match=r'differs in: learning_rate\)'
                     r'; choose another --workdir or pass --overwrite'):
    training.check_workdir(str(moved), tiny(
        moved, mnist_dir, learning_rate=1.0).config_record(), False)


def test_old_relative_data_dir_in_config_resumes(tmp_path, mnist_dir,
                                                 monkeypatch):
  """A config.json written before paths were normalised (relative data_dir,
  trailing slash) still matches the same folder."""
  workdir = tmp_path / 'work'
  workdir.mkdir()
  record = tiny(workdir, mnist_dir).config_record()
  monkeypatch.chdir(tmp_path)
  record['data_dir'] = os.path.relpath(mnist_dir) + '/'
  (workdir / training.CONFIG_FILE).write_text(json.dumps(record))
  assert training.check_workdir(str(workdir), tiny(
      workdir, mnist_dir).config_record(), False) == 'resume'


def test_recurrent_runs_keep_eval_every(tmp_path):
  """Recurrent evaluations drive the curriculum and early stopping."""
  workdir = str(tmp_path / 'work')
  exp = rnn_experiments.RecurrentExperiment(workdir=workdir, task='copy')
  resumable = tuple(k for k in training.RESUMABLE if k != 'eval_every')
  training.prepare_workdir(workdir, exp.config_record(), False,
                           resumable=resumable)
  other = rnn_experiments.RecurrentExperiment(workdir=workdir, task='copy',
                                              eval_every=7, log_every=3)
  with pytest.raises(training.WorkdirError, match=r'differs in: eval_every\)'):
    training.check_workdir(workdir, other.config_record(), False,
                           resumable=resumable)


def test_num_steps_may_grow_not_shrink(tmp_path):
  workdir = tmp_path / 'work'
  config = {'lr': 1.0, 'num_steps': 10}
  training.prepare_workdir(str(workdir), config, False)
  (workdir / training.RESULT_FILE).write_text('{}')
  assert training.check_workdir(str(workdir), config, False) == 'finished'
  with pytest.raises(training.WorkdirError,
                     match='--num_steps=5 is below the 10 of the run'):
    training.check_workdir(str(workdir), {'lr': 1.0, 'num_steps': 5}, False)
  longer = {'lr': 1.0, 'num_steps': 20}
  assert training.prepare_workdir(str(workdir), longer, False) == 'resume'
  assert not (workdir / training.RESULT_FILE).exists()
  assert json.loads((workdir / training.CONFIG_FILE).read_text()) == longer


def _untimed(workdir):
  rows = [json.loads(l) for l in (workdir / training.METRICS_FILE).open()]
  return [{k: v for k, v in r.items() if 'time' not in k} for r in rows]


def test_extending_a_finished_run_matches_the_longer_run(tmp_path, mnist_dir):
  """10 steps, then the same command with --num_steps=20: the metrics of a
  20-step run from scratch, row for row (the schedule is in absolute steps,
  the data order depends only on (seed, step))."""
  experiments.train_feedforward(tiny(tmp_path / 'long', mnist_dir,
                                     num_steps=20))
  short = tiny(tmp_path / 'extended', mnist_dir, num_steps=10)
  assert experiments.train_feedforward(short)['num_steps'] == 10
  result = experiments.train_feedforward(
      tiny(tmp_path / 'extended', mnist_dir, num_steps=20))
  assert result['num_steps'] == 20
  assert _untimed(tmp_path / 'extended') == _untimed(tmp_path / 'long')
  assert [r['step'] for r in _untimed(tmp_path / 'long')] == [5, 10, 15, 20]


# ---------------------------------------------------------------------------
# Unusable workdirs: one line naming the problem.
# ---------------------------------------------------------------------------

def test_workdir_under_a_file_is_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  for workdir in (blocker, blocker / 'run'):
    with pytest.raises(training.WorkdirError, match='is a file') as info:
      training.prepare_workdir(str(workdir), {'a': 1}, False)
    assert '\n' not in str(info.value)
  assert blocker.read_text() == 'x'


def test_unwritable_workdir_is_one_line(tmp_path, monkeypatch):
  """Read-only filesystem or missing permission (root ignores permission
  bits, so the OS answer is simulated)."""
  monkeypatch.setattr(training_workdir.os, 'access', lambda path, mode: False)
  with pytest.raises(training.WorkdirError,
                     match='not writable .read-only filesystem'):
    training.check_workdir(str(tmp_path / 'new'), {'a': 1}, False)
  with pytest.raises(training.WorkdirError,
                     match='is not writable .read-only filesystem'):
    training.check_workdir(str(tmp_path), {'a': 1}, False)
  monkeypatch.undo()

  def read_only(path, *args, **kw):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
  monkeypatch.setattr(training_workdir.os, 'makedirs', read_only)
  with pytest.raises(training.WorkdirError,
                     match=r'--workdir .*: .*new: Read-only file system$'):
    training.prepare_workdir(str(tmp_path / 'new'), {'a': 1}, False)


def test_failed_checkpoint_write_names_the_os_reason(tmp_path):
  checkpointer = training.Checkpointer(str(tmp_path))
  def full_disk(*args, **kw):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database'
                     ': Failed to write 100 bytes to file 18: No space left '
                     "on device [os_error_code='28']\nmore")
  checkpointer.manager.save = full_disk
  with pytest.raises(training.TrainingError) as info:
    checkpointer.save(5, {'x': 1})
  message = str(info.value)
  assert message.startswith(
      f'cannot save checkpoint 5 in {tmp_path}/checkpoints: '
      f'{os.strerror(errno.ENOSPC)}; ')
  assert '\n' not in message and 'rerun the same command' in message


def test_os_errors_and_interrupts_end_scripts_in_one_line(capsys):
  with pytest.raises(SystemExit) as info:
    with cli.one_line_errors('prog'):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/w/metrics.jsonl')
  assert info.value.code == 1
  assert capsys.readouterr().err == (
      'prog: error: /w/metrics.jsonl: No space left on device\n')
  with pytest.raises(SystemExit) as info:
    cli.no_positional_arguments(['/x/train_ff.py', 'stray'])
  assert info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith('train_ff.py: error: unexpected argument(s): stray')
  assert err.count('\n') == 1


def test_orbax_errors_are_logged_without_tracebacks(caplog):
  training.quiet_orbax_logging()
  training.quiet_orbax_logging()   # Idempotent: one filter.
  logger = logging.get_absl_logger()
  try:
    raise RuntimeError('inner')
  except RuntimeError:
    import sys  # pylint: disable=g-import-not-at-top
    exc_info = sys.exc_info()
  for level, path in ((std_logging.ERROR, '/site-packages/orbax/x.py'),
                      (std_logging.INFO, '/site-packages/orbax/x.py'),
                      (std_logging.ERROR, '/dni_jax/training/checkpoint.py')):
    logger.handle(logger.makeRecord(
        'absl', level, path, 1, 'failed: %s\nline two', ('why',), exc_info))
  records = [(r.pathname, r.getMessage(), r.exc_info) for r in caplog.records]
  assert records[0] == ('/site-packages/orbax/x.py', 'failed: why', None)
  assert len(records) == 2   # Orbax's INFO dropped; ours untouched.
  assert records[1][2] is not None


# ---------------------------------------------------------------------------
# Values no run can mean.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('make, flag', [
    (lambda w: experiments.FeedForwardExperiment(workdir=w,
                                                 num_layers=100000),
     '--num_layers=100000: must be at most 100 '),
    (lambda w: experiments.FeedForwardExperiment(workdir=w,
                                                 hidden_size=10**6),
     '--hidden_size=1000000: must be at most 16384 '),
    (lambda w: rnn_experiments.RecurrentExperiment(workdir=w, unroll=100000),
     '--unroll=100000: must be at most 1000 '),
    (lambda w: multinet_experiments.MultinetExperiment(
        workdir=w, data_dir=w, tick=1000, num_steps=10**6),
     '--tick=1000: must be at most 32 '),
])
def test_values_no_run_can_mean_are_refused(tmp_path, make, flag):
  with pytest.raises(ValueError) as info:
    make(str(tmp_path / 'w'))
  assert str(info.value).startswith(flag)
  assert not (tmp_path / 'w').exists()


# ---------------------------------------------------------------------------
# TFDS offline: fail at once, keep the download path.
# ---------------------------------------------------------------------------

def test_tfds_offline_fails_at_once_and_online_still_downloads(tmp_path,
                                                               monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  calls = []
  def data_source(name, *, split, data_dir, download=True):
    del name, split, data_dir
    calls.append(download)
    raise FileNotFoundError('not prepared')
  monkeypatch.setattr(tfds, 'data_source', data_source)
  probes = []
  def offline(host, port, timeout=5.0):
    probes.append((host, port))
    return False
  monkeypatch.setattr(tfds_source, 'can_reach', offline)
  with pytest.raises(datasets.DataError,
                     match='storage.googleapis.com .* cannot be reached'):
    datasets.load_dataset('mnist', 'train', str(tmp_path), 'tfds')
  assert calls == [False] and probes == [('storage.googleapis.com', 443)]

  calls.clear()
  monkeypatch.setattr(tfds_source, 'can_reach', lambda *a, **k: True)
  with pytest.raises(datasets.DataError, match='could not find or download'):
    datasets.load_dataset('mnist', 'train', str(tmp_path), 'tfds')
  assert calls == [False, True]


def test_checkpoint_of_an_older_payload_layout_still_restores(tmp_path):
  """A checkpoint written before a payload key existed restores through its
  older layout and is upgraded, instead of being moved aside."""
  from dni_jax import training as training_lib
  old = {'state': np.arange(3, dtype=np.float32),
         'train_loss_sum': np.float32(2.5)}
  ckpt = training_lib.Checkpointer(str(tmp_path))
  ckpt.save(7, old)
  ckpt.close()
  new = {**old, 'train_time': np.float32(0)}
  abstract = jax.eval_shape(lambda: new)
  without = {k: v for k, v in abstract.items() if k != 'train_time'}
  ckpt = training_lib.Checkpointer(str(tmp_path))
  step, payload = ckpt.restore_latest(
      abstract, older_layouts=((without, lambda p: {**p, 'train_time': -1.0}),))
  ckpt.close()
  assert step == 7
  np.testing.assert_array_equal(payload['state'], old['state'])
  assert float(payload['train_loss_sum']) == 2.5
  assert payload['train_time'] == -1.0
  assert not os.path.exists(tmp_path / training_lib.UNREADABLE_DIR)
  # Without the older layout the same checkpoint is moved aside.
  ckpt = training_lib.Checkpointer(str(tmp_path))
  assert ckpt.restore_latest(abstract) == (0, None)
  ckpt.close()
  assert os.path.isdir(tmp_path / training_lib.UNREADABLE_DIR / '7')


def test_a_failing_upgrade_is_raised_and_the_checkpoint_kept(tmp_path):
  """A checkpoint that restores as an older layout but whose upgrade fails
  is a bug in the upgrade: the error reaches the caller and the readable
  checkpoint stays where it is (not moved aside as unreadable)."""
  from dni_jax import training as training_lib
  old = {'state': np.arange(3, dtype=np.float32)}
  ckpt = training_lib.Checkpointer(str(tmp_path))
  ckpt.save(5, old)
  ckpt.close()
  abstract = jax.eval_shape(lambda: {**old, 'train_time': np.float32(0)})

  def broken_upgrade(payload):
    raise KeyError('an upgrade bug')
  ckpt = training_lib.Checkpointer(str(tmp_path))
  with pytest.raises(KeyError, match='an upgrade bug'):
    ckpt.restore_latest(abstract, older_layouts=(
        (jax.eval_shape(lambda: old), broken_upgrade),))
  ckpt.close()
  assert not os.path.exists(tmp_path / training_lib.UNREADABLE_DIR)
  assert os.path.isdir(tmp_path / 'checkpoints' / '5')


def test_orbax_write_tasks_logged_by_asyncio_are_dropped(caplog):
  """A failed save may leave asyncio logging each failed orbax write task
  with its traceback: those records are dropped, others are kept."""
  training.quiet_orbax_logging()
  asyncio_logger = std_logging.getLogger('asyncio')
  with caplog.at_level('ERROR', logger='asyncio'):
    asyncio_logger.error(
        'Task exception was never retrieved\nfuture: <Task finished '
        "coro=<async_serialize_from_host() defined at .../orbax/checkpoint/"
        "serialization.py:126> exception=ValueError('OUT_OF_RANGE')>")
    asyncio_logger.error('Task exception was never retrieved\nfuture: '
                         '<Task finished coro=<user_code()>>')
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1 and 'user_code' in messages[0]

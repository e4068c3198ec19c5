"""scripts/train_ff.py data parallel: 2 fake devices in one process, and 2
processes on 127.0.0.1 with 2 CPU devices each (a global mesh of 4, gloo for
the cross-process collectives). Every run must agree with one device, and
both processes must report the same result; process 0 alone writes the
workdir files."""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from dni_jax import experiments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FF = os.path.join(REPO, 'scripts', 'train_ff.py')
# A single DNI below the classifier: well conditioned, so runs that differ
# only in the order of float sums stay within a tight tolerance.
SETTINGS = dict(dataset='mnist', method='cdni', num_layers=3, dni_layers=(2,),
                hidden_size=32, sg_hidden_size=32, learning_rate=3e-3,
                lr_boundaries=(), batch_size=32, num_steps=12, eval_every=6,
                log_every=6, checkpoint_every=6)
ARGS = ('--dataset=mnist', '--method=cdni', '--num_layers=3', '--dni_layers=2',
        '--hidden_size=32', '--sg_hidden_size=32', '--learning_rate=3e-3',
        '--lr_boundaries=', '--batch_size=32', '--num_steps=12',
        '--eval_every=6', '--log_every=6', '--checkpoint_every=6')


@pytest.fixture(scope='module')
def single_device(tmp_path_factory):
  """The reference: this process, one device. (workdir, result)."""
  root = tmp_path_factory.mktemp('single')
  from conftest import write_mnist_like  # pylint: disable=g-import-not-at-top
  data_dir = write_mnist_like(str(root / 'mnist'))
  workdir = root / 'run'
  result = experiments.train_feedforward(experiments.FeedForwardExperiment(
      workdir=str(workdir), data_dir=data_dir, num_devices=1, **SETTINGS))
  assert result['num_devices'] == 1
  return data_dir, workdir, result


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(num_cpu_devices: int) -> dict:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_cpu_devices),
             JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def logged_result(stderr: str) -> dict:
  """The dict train_ff.py logs as `result: {...}`, less its own timing."""
  lines = [l for l in stderr.splitlines() if '] result: {' in l]
  assert len(lines) == 1, stderr[-3000:]
  result = ast.literal_eval(lines[0].split('] result: ', 1)[1])
  result.pop('steps_per_sec')
  result.pop('train_time')   # Each process times its own loop.
  return result


def read_json(path):
  return json.loads(path.read_text())


def assert_same_run(workdir, reference_dir):
  """Same config (but the workdir) and metrics within float tolerance."""
  config, ref_config = (read_json(d / 'config.json')
                        for d in (workdir, reference_dir))
  assert config.pop('workdir') == str(workdir)
  ref_config.pop('workdir')
  assert config == ref_config
  rows, ref_rows = ([json.loads(l) for l in
                     (d / 'metrics.jsonl').read_text().splitlines()]
                    for d in (workdir, reference_dir))
  assert [r['step'] for r in rows] == [r['step'] for r in ref_rows] == [6, 12]
  for row, ref in zip(rows, ref_rows):
    assert row['test_error'] == ref['test_error']
    for key in ('train_loss', 'test_loss'):
      assert row[key] == pytest.approx(ref[key], rel=1e-4), key
    for key in ('sg_loss', 'sg_cosine', 'sg_l2_error'):
      assert row[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_num_devices_two_agrees_with_one_device_and_resumes_on_four(tmp_path, single_device):
  data_dir, reference_dir, _ = single_device
  workdir = tmp_path / 'two'
  proc = subprocess.run(
      [sys.executable, TRAIN_FF, *ARGS, f'--data_dir={data_dir}',
       f'--workdir={workdir}', '--num_devices=2'],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env=environment(2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = read_json(workdir / 'result.json')
  assert result['num_devices'] == 2 and result['num_processes'] == 1
  assert 'data parallel over 2 devices in 1 processes' in proc.stderr
  assert_same_run(workdir, reference_dir)

  # Checkpoints restore onto the mesh, and the device count is not part of
  # the run's configuration: killed after step 6, it resumes on 4 devices.
  (workdir / 'result.json').unlink()
  shutil.rmtree(workdir / 'checkpoints' / '12')
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  (workdir / 'metrics.jsonl').write_text(lines[0] + '\n')
  resumed = experiments.train_feedforward(experiments.FeedForwardExperiment(
      workdir=str(workdir), data_dir=data_dir, num_devices=4, **SETTINGS))
  assert resumed['num_devices'] == 4
  assert_same_run(workdir, reference_dir)


@pytest.mark.slow
def test_two_processes_agree_with_one_device(tmp_path, single_device):
  data_dir, reference_dir, reference = single_device
  workdir = tmp_path / 'multi'
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, TRAIN_FF, *ARGS, f'--data_dir={data_dir}',
       f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}', '--num_devices=2'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
      env=environment(2)) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=400))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  results = [logged_result(err) for _, err in outputs]
  assert results[0] == results[1]          # The same global result.
  assert results[0]['num_devices'] == 4 and results[0]['num_processes'] == 2
  # Process 0 wrote the workdir files; both wrote the checkpoints.
  written = read_json(workdir / 'result.json')
  written.pop('steps_per_sec')
  written.pop('train_time')
  assert written == results[0]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '6']
  assert_same_run(workdir, reference_dir)
  for key in ('test_error', 'best_test_error', 'best_step', 'num_steps'):
    assert results[0][key] == reference[key], key
  for key in ('test_loss', 'train_loss'):
    assert results[0][key] == pytest.approx(reference[key], rel=1e-4), key

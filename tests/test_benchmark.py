"""scripts/benchmark.py: output format only (tiny sizes; a benchmark is not a
timed test)."""

import json
import os
import subprocess
import sys

import pytest

from dni_jax import benchmarking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'benchmark.py')
TINY = ['--batch_size=16', '--hidden_size=16', '--num_layers=3', '--warmup=1',
        '--steps=2']


def run(*args, timeout=300):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_pipeline_suite_over_devices_writes_json_and_table(tmp_path):
  out = str(tmp_path / 'pipeline.json')
  proc = run('--suite=pipeline', '--num_devices=2', '--microbatches=2',
             '--balance=flops', f'--json={out}', *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  for key in ('pipeline_speedup', 'backprop_pipeline_speedup',
              'pipeline_tick_s', 'backprop_pipeline_step_s',
              'single_device_step_s', 'communication_s',
              'load_average_before', 'command'):
    assert key in result, key
  assert result['pipeline_speedup'] > 0
  assert result['examples_per_second']['dni_pipeline'] == pytest.approx(
      16 / result['pipeline_tick_s'])
  assert len(result['stage_compute_s']) == 2
  # Up: batch x (width + label + flag) float32; down: batch x width.
  assert result['message_bytes_up'] == 16 * 18 * 4
  assert result['message_bytes_down'] == 16 * 16 * 4
  assert result['device']['num_devices'] >= 2
  assert result['network']['stage_boundaries'] in ([1], [2])
  with open(out + '.md') as f:
    table = f.read()
  assert table.startswith('| way |') and 'decoupled cDNI pipeline' in table


def test_models_suite_rows_have_every_column():
  """In-process (the script's models suite calls exactly this)."""
  rows = benchmarking.run_models_suite(['fcn'], ['cdni'], batch_size=8,
                                       warmup=1, steps=2, peak_flops=1e9)
  assert [(r['method'], r['dispatch']) for r in rows] == [
      ('cdni', 'fused'), ('cdni', 'per_layer')]
  for r in rows:
    assert r['step_ms'] > 0 and r['flops_per_step'] > 0
    assert r['fraction_of_matmul_peak'] == pytest.approx(
        r['flops_per_s'] / 1e9)
    assert r['step_time_vs_bprop'] is None   # No Bprop row to compare with.
  table = benchmarking.markdown_table(rows, ['model', 'method', 'step_ms'])
  assert table.count('\n') == 4


def test_models_suite_lstm_rows():
  """The PTB LSTM: one fused row per recurrent method (cdni skipped), one
  example per character step."""
  rows = benchmarking.run_models_suite(
      ['lstm'], ['bprop', 'dni', 'cdni', 'dni_aux'], batch_size=4, warmup=1,
      steps=2, peak_flops=1e9,
      overrides={'lstm': {'hidden_size': 8, 'vocab': 5, 'unroll': 3}})
  assert [(r['model'], r['method'], r['dispatch']) for r in rows] == [
      ('lstm', 'bprop', 'fused'), ('lstm', 'dni', 'fused'),
      ('lstm', 'dni_aux', 'fused')]
  for r in rows:
    assert r['examples_per_step'] == 12 and r['unroll'] == 3
    assert r['samples_per_s'] == pytest.approx(12e3 / r['step_ms'])
    assert r['flops_per_step'] > 0
  assert rows[0]['step_time_vs_bprop'] == 1.0
  # DNI does strictly more arithmetic than truncated BPTT (the SG model).
  assert rows[1]['flops_per_step'] > rows[0]['flops_per_step']


def test_data_parallel_suite_lstm_rows():
  rows = benchmarking.run_data_parallel_suite(
      'lstm', 'dni', [1, 2], batch_size=4, warmup=1, steps=2,
      overrides={'hidden_size': 8, 'vocab': 5, 'unroll': 3})
  assert [r['devices'] for r in rows] == [1, 2]
  assert all(r['examples_per_step'] == 12 for r in rows)
  assert rows[0]['speedup_vs_1'] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize('args,needle', [
    (['--suite=pipeline'], 'exactly one of --processes'),
    (['--suite=pipeline', '--processes=64'], '--processes=64'),
    (['--suite=pipeline', '--num_devices=2', '--microbatches=3'],
     '--microbatches=3'),
    (['--suite=models', '--models=rnn'], '--models=rnn'),
    (['--suite=data_parallel', '--models=rnn'], '--models=rnn'),
    (['--suite=models', '--models=fcn', '--methods=dni_aux'],
     'no method applies'),
])
def test_bad_flags_give_one_error_line(tmp_path, args, needle):
  proc = run(*args, f'--json={tmp_path}/x.json', timeout=120)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_markdown_table_formats_numbers_and_missing_values():
  table = benchmarking.markdown_table(
      [{'a': 1.23456, 'b': None}, {'a': 'x', 'b': 3}], ['a', 'b'])
  assert table.splitlines() == ['| a | b |', '|---|---|', '| 1.235 | – |',
                                '| x | 3 |']

"""scripts/benchmark.py: output format only (tiny sizes; a benchmark is not a
timed test)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dni_jax import bench_metrics
from dni_jax import benchmarking
from dni_jax import feedforward

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
              'pipeline_dispatch_s', 'single_device_dispatch_s',
              'load_average_before', 'command'):
    assert key in result, key
  assert result['pipeline_speedup'] > 0
  assert result['examples_per_second']['dni_pipeline'] == pytest.approx(
      16 / result['pipeline_tick_s'])
  assert len(result['stage_compute_s']) == 2
  assert 0 < result['pipeline_dispatch_s'] <= result['pipeline_tick_s'] * 2
  assert result['pipeline_speedup_bound'] == pytest.approx(
      result['single_device_step_s'] / max(result['stage_compute_s']))
  # Up: batch x (width + label + flag) float32; down: batch x width.
  assert result['message_bytes_up'] == 16 * 18 * 4
  assert result['message_bytes_down'] == 16 * 16 * 4
  assert result['device']['num_devices'] >= 2
  assert result['network']['stage_boundaries'] in ([1], [2])
  with open(out + '.md') as f:
    table = f.read()
  assert table.startswith('| way |') and 'decoupled cDNI pipeline' in table



def test_two_stage_balancing_times_every_split():
  from dni_jax import bench_pipeline
  spec = {'input_shape': [4, 4, 1], 'num_layers': 4, 'hidden_size': 8,
          'batch_size': 8, 'num_stages': 2}
  times = bench_pipeline.split_stage_times(spec)
  assert sorted(times) == [1, 2]   # After layer 1 or 2 (3: the classifier).
  assert all(len(t) == 2 and min(t) > 0 for t in times.values())

def settings(**kw):
  return benchmarking.RowSettings(**{'batch_size': 8, 'warmup': 1,
                                     'steps': 2, 'peak_flops': 1e9, **kw})


def test_models_suite_rows_have_every_column():
  """In-process (the script's models suite calls exactly this)."""
  rows = benchmarking.run_models_suite(['fcn'], ['cdni'], settings())
  assert [(r['method'], r['dispatch']) for r in rows] == [
      ('cdni', 'fused'), ('cdni', 'per_layer')]
  for r in rows:
    assert r['step_ms'] > 0 and r['hlo_flops_per_step'] > 0
    assert r['steps_per_s'] == pytest.approx(1e3 / r['step_ms'])
    assert r['examples_per_s'] == pytest.approx(8e3 / r['step_ms'])
    assert r['model_flops_per_step'] > 0 and r['sg_model_flops_per_step'] > 0
    assert r['hlo_utilisation'] == pytest.approx(r['hlo_flops_per_s'] / 1e9)
    assert r['model_utilisation'] == pytest.approx(
        (r['model_flops_per_step'] + r['sg_model_flops_per_step'])
        * r['steps_per_s'] / 1e9)
    assert r['compiled_memory_bytes'] > 0
    assert r['dtype'] == 'float32'
    assert r['step_time_vs_bprop'] is None   # No Bprop row to compare with.
  table = benchmarking.markdown_table(rows, ['model', 'method', 'step_ms'])
  assert table.count('\n') == 4


def test_models_suite_lstm_rows():
  """The PTB LSTM: one fused row per recurrent method (cdni skipped), one
  example per character step."""
  rows = benchmarking.run_models_suite(
      ['lstm'], ['bprop', 'dni', 'cdni', 'dni_aux'], settings(batch_size=4),
      overrides={'lstm': {'hidden_size': 8, 'vocab': 5, 'unroll': 3}})
  assert [(r['model'], r['method'], r['dispatch']) for r in rows] == [
      ('lstm', 'bprop', 'fused'), ('lstm', 'dni', 'fused'),
      ('lstm', 'dni_aux', 'fused')]
  for r in rows:
    assert r['examples_per_step'] == 12 and r['unroll'] == 3
    assert r['examples_per_s'] == pytest.approx(12e3 / r['step_ms'])
    assert r['hlo_flops_per_step'] > 0
  assert rows[0]['step_time_vs_bprop'] == 1.0
  # DNI does strictly more arithmetic than truncated BPTT (the SG model).
  assert rows[1]['hlo_flops_per_step'] > rows[0]['hlo_flops_per_step']
  assert rows[0]['sg_model_flops_per_step'] == 0
  assert 0 < rows[1]['sg_model_flops_per_step'] < rows[2][
      'sg_model_flops_per_step']


def test_feedforward_model_flops_match_a_written_out_count():
  """FCN 16 -> 8 -> 8 -> 10, batch 5: every matrix product written out; a
  trained module costs 3 forward passes (forward, input and weight
  gradients), 2 FLOPs per multiply-add."""
  base_products = [(16, 8), (8, 8), (8, 10)]
  expected_base = 3 * 2 * 5 * sum(i * o for i, o in base_products)
  # DNI: after each of the 2 hidden layers an MLP 8 -> 12 -> 12 -> 8.
  dni_products = [(8, 12), (12, 12), (12, 8)] * 2
  # cDNI: a linear model on [h, one-hot label]: (8 + 10) -> 8, twice.
  cdni_products = [(18, 8)] * 2
  for method, products, sg_layers in (('bprop', [], 2),
                                      ('dni', dni_products, 2),
                                      ('cdni', cdni_products, 0)):
    config = feedforward.FeedForwardConfig(
        input_shape=(4, 4, 1), num_layers=3, hidden_size=8, method=method,
        sg_hidden_layers=sg_layers, sg_hidden_size=12)
    flops = bench_metrics.feedforward_flops(config, batch_size=5)
    assert flops == {'base': expected_base, 'synthetic': 3 * 2 * 5 * sum(
        i * o for i, o in products)}, method


def test_recurrent_model_flops_match_a_written_out_count():
  """LSTM, 5 symbols (one-hot), 8 units, T = 3, batch 4: per step the gate
  products [x, h] (5 + 8) -> 4 x 8 and the readout 8 -> 5."""
  per_step = (5 + 8) * 32 + 8 * 5
  config = benchmarking.lstm_config('bprop', hidden_size=8, vocab=5, unroll=3)
  assert bench_metrics.recurrent_flops(config, 4) == {
      'base': 3 * 2 * 4 * 3 * per_step, 'synthetic': 0}
  # DNI: M (8 -> 8 -> 16) predicts once and trains once (3 passes); one
  # replayed core step, forward only.
  config = benchmarking.lstm_config('dni', hidden_size=8, vocab=5, unroll=3)
  m = 8 * 8 + 8 * 16
  assert bench_metrics.recurrent_flops(config, 4)['synthetic'] == 2 * 4 * (
      4 * m + (5 + 8) * 32)
  # DNI + Aux: M at the 3 steps (the last one is the boundary's) and trained
  # once; A trained at the 3 steps; the 3 replayed core steps forward and
  # backward.
  config = benchmarking.lstm_config('dni_aux', hidden_size=8, vocab=5,
                                    unroll=3)
  assert bench_metrics.recurrent_flops(config, 4)['synthetic'] == 2 * 4 * (
      3 * m + 3 * m + 3 * 3 * m + 3 * 3 * (5 + 8) * 32)


def test_hlo_flops_within_a_sane_factor_of_model_flops_for_bprop():
  """XLA counts element-wise work too and skips the input gradient of the
  first layer; at 28x28 -> 64 x 3 -> 10, batch 32, the products dominate."""
  config = feedforward.FeedForwardConfig(num_layers=4, hidden_size=64,
                                         method='bprop')
  ff = feedforward.make_feedforward(config)
  images = jnp.zeros((32, 28, 28, 1))
  labels = jnp.zeros((32,), jnp.int32)
  stats = bench_metrics.compiled_stats(ff.train_step, ff.init(
      jax.random.key(0)), images, labels)
  model = bench_metrics.feedforward_flops(config, 32)['base']
  assert 0.5 < stats['hlo_flops'] / model < 2.0, (stats, model)


def test_bfloat16_reaches_the_compiled_step_and_lstm_refuses_it():
  """--dtype=bfloat16 changes the FCN's compiled matmuls (no flag that does
  nothing); the recurrent rows refuse it."""
  def hlo(dtype):
    config = feedforward.FeedForwardConfig(
        input_shape=(4, 4, 1), num_layers=3, hidden_size=8, method='cdni',
        dtype=dtype)
    ff = feedforward.make_feedforward(config)
    return ff.train_step.lower(ff.init(jax.random.key(0)),
                               jnp.zeros((4, 4, 4, 1)),
                               jnp.zeros((4,), jnp.int32)).as_text()
  assert 'bf16' in hlo('bfloat16') and 'bf16' not in hlo('float32')
  rows = benchmarking.run_models_suite(
      ['fcn'], ['bprop'], settings(dtype='bfloat16'),
      overrides={'fcn': {'hidden_size': 8, 'input_shape': (4, 4, 1)}})
  assert {r['dtype'] for r in rows} == {'bfloat16'}
  with pytest.raises(ValueError, match='lstm'):
    benchmarking.run_models_suite(['lstm'], ['bprop'],
                                  settings(dtype='bfloat16'))


def test_profile_steps_writes_a_trace(tmp_path):
  rows = benchmarking.run_models_suite(
      ['fcn'], ['bprop'], settings(profile_steps=2,
                                   profile_dir=str(tmp_path)),
      overrides={'fcn': {'hidden_size': 8, 'input_shape': (4, 4, 1)}})
  fused, per_layer = rows
  assert 'profile_files' not in per_layer
  traces = [f for f in fused['profile_files'] if f.endswith('.xplane.pb')]
  assert traces and all(os.path.getsize(f) > 0 for f in traces)
  assert traces[0].startswith(str(tmp_path / 'fcn_bprop_fused_float32'))


def test_datasheet_peaks():
  assert bench_metrics.datasheet_peak('NVIDIA H200', 'bfloat16')[0] == (
      pytest.approx(989.4e12))
  assert bench_metrics.datasheet_peak('NVIDIA H100 PCIe', 'float32')[0] == (
      pytest.approx(378e12))
  assert bench_metrics.datasheet_peak('TPU v5 lite', 'bfloat16')[0] == (
      pytest.approx(197e12))
  assert bench_metrics.datasheet_peak('TPU v4', 'float32')[0] is None
  peak, why = bench_metrics.datasheet_peak('Some GPU', 'bfloat16')
  assert peak is None and 'Some GPU' in why


@pytest.mark.slow
def test_accelerator_check_runs_end_to_end_at_small_size(tmp_path):
  """scripts/accelerator_check.sh with DNI_CHECK_SMALL=1 on the CPU (two
  fake devices): every part, one JSON, one markdown summary."""
  env = dict(os.environ, DNI_CHECK_SMALL='1', PYTHON=sys.executable)
  env.pop('XLA_FLAGS', None)
  out = tmp_path / 'check'
  proc = subprocess.run([os.path.join(ROOT, 'scripts', 'accelerator_check.sh'),
                         str(out)], capture_output=True, text=True,
                        timeout=1800, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / 'accelerator_check.json') as f:
    result = json.load(f)
  parts = result['parts']
  assert result['small'] and result['device']['num_devices'] == 2
  assert {(r['model'], r['method']) for r in parts['models']} == {
      (m, k) for m in ('fcn', 'cnn') for k in ('bprop', 'dni', 'cdni')} | {
          ('lstm', k) for k in ('bprop', 'dni', 'dni_aux')}
  assert all(r['unroll'] == 5 for r in parts['models'] if r['model'] ==
             'lstm')
  assert {r['dtype'] for r in parts['models_bfloat16']} == {'bfloat16'}
  assert {r['devices'] for r in parts['data_parallel']} == {1, 2}
  assert parts['pipeline']['num_stages'] == 2
  assert parts['table1_row']['hours_for_paper_steps'] > 0
  assert result['peak_flops_per_s_float32'] > 0
  for name in ('models', 'models_bfloat16', 'data_parallel', 'pipeline',
               'table1_row', 'total'):
    assert result['seconds'][name] > 0
  with open(out / 'accelerator_check.md') as f:
    summary = f.read()
  for heading in ('## Models, float32', '## Models, bfloat16',
                  '## Data parallel', '## Pipeline', '## Table 1 row'):
    assert heading in summary


def test_data_parallel_suite_lstm_rows():
  rows = benchmarking.run_data_parallel_suite(
      'lstm', 'dni', [1, 2], batch_size=4, warmup=1, steps=2,
      overrides={'hidden_size': 8, 'vocab': 5, 'unroll': 3})
  assert [r['devices'] for r in rows] == [1, 2]
  assert all(r['examples_per_step'] == 12 for r in rows)
  assert all(r['examples_per_s'] == pytest.approx(12e3 / r['step_ms'])
             for r in rows)
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
    (['--suite=models', '--dtype=bfloat16'], 'float32 only'),
    (['--suite=pipeline', '--num_devices=2', '--profile_steps=3'],
     '--profile_steps'),
    (['--suite=accelerator_check'], '--out_dir'),
    (['--suite=models', '--small'], '--small'),
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


def test_lstm_hlo_flops_count_every_step_of_the_unroll():
  """XLA's cost analysis counts a scan body once; the LSTM rows trace the step
  with the scan unrolled, so doubling T about doubles the HLO FLOPs and they
  stay near the analytic count (counted once, the scan would give ~1x and
  a fraction of it)."""
  flops = {}
  for unroll in (4, 8):
    (row,) = benchmarking.run_models_suite(
        ['lstm'], ['bprop'], settings(batch_size=4),
        overrides={'lstm': {'hidden_size': 128, 'vocab': 5, 'unroll': unroll}})
    flops[unroll] = row['hlo_flops_per_step']
    # Analytic: 3 x (the core's 4 gates over [x; h] + the readout) per step.
    analytic = 3 * 2 * 4 * unroll * (4 * (5 + 128) * 128 + 128 * 5)
    assert analytic <= flops[unroll] <= 1.5 * analytic
  assert flops[8] / flops[4] == pytest.approx(2.0, rel=0.05)

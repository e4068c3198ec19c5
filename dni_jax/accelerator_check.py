"""The prepared accelerator check (`scripts/accelerator_check.sh`, i.e.
`scripts/benchmark.py --suite=accelerator_check`): everything a machine with
one (or a few) accelerators should measure, in one process, written as one
JSON and one markdown summary.

Parts: (1) the models suite in float32: FCN and CNN (A.1 MNIST sizes;
Bprop / DNI / cDNI, fused and per-layer) and the PTB LSTM-1024 at T = 5
(truncated BPTT / DNI / DNI + Aux); (2) the FCN and CNN rows again in
bfloat16 (the LSTM stays float32); (3) data parallelism over 1..N of the
devices present; (4) the decoupled and backprop pipelines over all N
devices (N >= 2; skipped, with the reason, on one device); (5) one full-size
Table 1 row, the CIFAR-10 CNN of 4 layers and 128 filters trained with
cDNI, batch 256, timed over a few hundred steps on random CIFAR-shaped
inputs (the check needs no data set), with the time the paper's 500k steps
would take at that rate.

`small=True` shrinks every size (and the step counts) so that the whole
check runs end to end on a CPU in well under a minute; the test does that.
"""

import json
import os
import time

import jax

from dni_jax import bench_metrics as bmx
from dni_jax import benchmarking as bm
from dni_jax import feedforward

PAPER_STEPS = 500_000   # A.1: every Table 1 run.
FULL = dict(batch_size=256, warmup=3, steps=20, table1_steps=200,
            peak_matmul=bmx.MATMUL_SIZES,
            overrides={}, pipeline=dict(num_layers=6, hidden_size=256,
                                        input_shape=[28, 28, 1]),
            table1=dict(input_shape=(32, 32, 3), hidden_size=128,
                        sg_hidden_size=128))
SMALL = dict(batch_size=8, warmup=1, steps=2, table1_steps=3,
             peak_matmul=(128, 256),
             overrides={'fcn': {'hidden_size': 16, 'sg_hidden_size': 16,
                                'input_shape': (8, 8, 1)},
                        'cnn': {'hidden_size': 4, 'sg_hidden_size': 4,
                                'input_shape': (8, 8, 1)},
                        'lstm': {'hidden_size': 8, 'vocab': 5, 'unroll': 5}},
             pipeline=dict(num_layers=3, hidden_size=16,
                           input_shape=[8, 8, 1]),
             table1=dict(input_shape=(8, 8, 3), hidden_size=4,
                         sg_hidden_size=4))
MODEL_COLUMNS = ['model', 'method', 'dispatch', 'dtype', 'step_ms',
                 'steps_per_s', 'examples_per_s', 'hlo_flops_per_step',
                 'model_flops_per_step', 'sg_model_flops_per_step',
                 'hlo_utilisation', 'model_utilisation', 'peak_memory_bytes',
                 'compiled_memory_bytes', 'step_time_vs_bprop']
DP_COLUMNS = ['model', 'method', 'dtype', 'devices', 'step_ms', 'steps_per_s',
              'examples_per_s', 'speedup_vs_1']


def table1_row(sizes: dict, settings: bm.RowSettings) -> dict:
  """Table 1, CIFAR-10 CNN, 4 layers, cDNI (`scripts/reproduce.py`'s
  cnn4_cdni of table1_cifar10_cnn) at full size, timed (random inputs)."""
  config = feedforward.FeedForwardConfig(
      model='cnn', num_layers=4, method='cdni', dtype=settings.dtype,
      learning_rate=3e-5, lr_boundaries=(), **sizes)
  ff = feedforward.make_feedforward(config)
  images, labels = (jax.numpy.asarray(v) for v in bm._model_batch(
      config, settings.batch_size))
  init = lambda: ff.init(jax.random.key(0))
  row = {'model': 'table1_cifar10_cnn4', 'method': 'cdni',
         'dispatch': 'fused', 'dtype': settings.dtype, 'devices': 1,
         'batch_size': settings.batch_size, 'hidden_size': config.hidden_size}
  row = bm.time_row(row, settings, ff.train_step, init, (images, labels),
                    settings.batch_size,
                    bmx.feedforward_flops(config, settings.batch_size),
                    bmx.compiled_stats(ff.train_step, init(), images, labels),
                    True)
  row['paper_steps'] = PAPER_STEPS
  row['hours_for_paper_steps'] = PAPER_STEPS / row['steps_per_s'] / 3600
  return row


def _pipeline(sizes: dict, n: int) -> dict:
  """The pipeline suite over `n` devices of this process."""
  spec = {'mode': 'pipelines', 'num_stages': n, 'microbatches': 2,
          'batch_size': sizes['batch_size'], 'warmup': sizes['warmup'],
          'steps': sizes['steps'], 'balance': 'measured',
          'steps_per_call': 1, **sizes['pipeline']}
  baseline = bm.run_baseline(spec)
  spec['boundaries'] = baseline['boundaries']
  return bm.summarize_pipeline(spec, baseline, [bm.run_pipelines(spec)],
                               'devices')


def run(out_dir: str, small: bool = False, profile_steps: int = 0) -> dict:
  """Runs every part; writes OUT_DIR/accelerator_check.json and .md."""
  sizes = SMALL if small else FULL
  os.makedirs(out_dir, exist_ok=True)
  n = jax.device_count()
  result = {'suite': 'accelerator_check', 'small': small,
            'device': bm.device_info(), 'parts': {}, 'seconds': {},
            'load_average_before': bm.load_average()}
  start = time.perf_counter()

  def part(name, fn):
    t = time.perf_counter()
    result['parts'][name] = fn()
    result['seconds'][name] = time.perf_counter() - t

  for dtype in ('float32', 'bfloat16'):
    peak, source = bmx.peak_for(dtype, sizes['peak_matmul'])
    result[f'peak_flops_per_s_{dtype}'] = peak
    result[f'peak_source_{dtype}'] = source

  def settings(dtype, steps=sizes['steps']):
    return bm.RowSettings(sizes['batch_size'], sizes['warmup'], steps, dtype,
                          result[f'peak_flops_per_s_{dtype}'], profile_steps,
                          os.path.join(out_dir, 'profile'))

  part('models', lambda: bm.run_models_suite(
      ['fcn', 'cnn', 'lstm'], bm.ALL_METHODS, settings('float32'),
      sizes['overrides']))
  part('models_bfloat16', lambda: bm.run_models_suite(
      ['fcn', 'cnn'], bm.ALL_METHODS, settings('bfloat16'),
      sizes['overrides']))
  counts = [k for k in range(1, n + 1) if sizes['batch_size'] % k == 0]
  part('data_parallel', lambda: [
      r for model, method in (('fcn', 'bprop'), ('fcn', 'cdni'),
                              ('lstm', 'dni'))
      for r in bm.run_data_parallel_suite(
          model, method, counts, sizes['batch_size'], sizes['warmup'],
          sizes['steps'], sizes['overrides'].get(model))])
  if n >= 2:
    part('pipeline', lambda: _pipeline(
        sizes, min(n, sizes['pipeline']['num_layers'])))
  else:
    result['parts']['pipeline'] = {
        'skipped': f'{n} device: the pipeline needs at least 2 (one stage '
                   'each)'}
  part('table1_row', lambda: table1_row(
      sizes['table1'], settings('float32', sizes['table1_steps'])))
  result['seconds']['total'] = time.perf_counter() - start
  result['load_average_after'] = bm.load_average()
  with open(os.path.join(out_dir, 'accelerator_check.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, 'accelerator_check.md'), 'w') as f:
    f.write(summary_markdown(result))
  return result


def summary_markdown(result: dict) -> str:
  parts, device = result['parts'], result['device']
  lines = [f'# Accelerator check{" (small sizes)" if result["small"] else ""}',
           '', f'Device: {device["device_kind"]} x {device["num_devices"]} '
           f'({device["backend"]}); total {result["seconds"]["total"]:.0f} s.']
  for dtype in ('float32', 'bfloat16'):
    peak = result[f'peak_flops_per_s_{dtype}']
    lines.append(f'Peak {dtype}: ' + (f'{peak / 1e12:.4g} TFLOP/s'
                                      if peak else 'n/a')
                 + f' ({result[f"peak_source_{dtype}"]}).')
  lines += ['', '## Models, float32', '',
            bm.markdown_table(parts['models'], MODEL_COLUMNS),
            '## Models, bfloat16 (FCN / CNN layers)', '',
            bm.markdown_table(parts['models_bfloat16'], MODEL_COLUMNS),
            '## Data parallel', '',
            bm.markdown_table(parts['data_parallel'], DP_COLUMNS),
            '## Pipeline', '']
  if 'skipped' in parts['pipeline']:
    lines.append(f'Skipped: {parts["pipeline"]["skipped"]}.\n')
  else:
    lines.append(bm.pipeline_markdown(parts['pipeline']))
  row = parts['table1_row']
  lines += ['## Table 1 row: CIFAR-10 CNN, 4 layers, cDNI (random inputs)', '',
            bm.markdown_table([row], MODEL_COLUMNS[:11]),
            f'At this rate the paper\'s {row["paper_steps"]} steps take '
            f'{row["hours_for_paper_steps"]:.3g} h.', '']
  return '\n'.join(lines)

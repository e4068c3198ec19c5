r"""Benchmarks: step time, samples/s, FLOP/s, memory; data parallelism; the
decoupled pipeline against the backprop pipeline. Runs unchanged on CPU, GPU
and TPU.

  # Fused vs per-layer dispatch, Bprop / DNI / cDNI, FCN and CNN, and the
  # PTB LSTM (truncated BPTT / DNI / DNI + Aux), one device:
  python scripts/benchmark.py --suite=models --json=/tmp/models.json
  # Data parallelism over 1..N devices (on CPU: N fake devices):
  python scripts/benchmark.py --suite=data_parallel --num_devices=2 \
      --json=/tmp/dp.json
  # The decoupled pipeline, one process per core (CPU hosts); the paper's
  # CIFAR-10 FCN width with --hidden_size=1000:
  python scripts/benchmark.py --suite=pipeline --processes=2 \
      --json=/tmp/pipeline.json
  # ... or over the devices of this process (accelerators; fake CPU devices):
  python scripts/benchmark.py --suite=pipeline --num_devices=2 \
      --json=/tmp/pipeline_devices.json
  # The FCN / CNN layers in bfloat16, and a jax.profiler trace of 5 steps of
  # every fused row (under the JSON's folder, profile/):
  python scripts/benchmark.py --suite=models --models=fcn,cnn \
      --dtype=bfloat16 --profile_steps=5 --json=/tmp/bf16/models.json
  # Everything an accelerator machine should measure, one JSON + markdown
  # (scripts/accelerator_check.sh runs this; --small: tiny sizes, CPU):
  python scripts/benchmark.py --suite=accelerator_check --out_dir=/tmp/check

Each run writes the JSON and, beside it, a markdown table (FILE.md).
Models rows report steps/s, examples/s, the compiled step's HLO FLOPs, the
analytic model FLOPs (base network; synthetic-gradient models apart), both
as a fraction of the peak (CPU: a float32 matmul measured in the run;
GPU/TPU: the datasheet, `dni_jax.bench_metrics`), and peak memory.
"""

import json
import os
import sys
import tempfile

from absl import app
from absl import flags

flags.DEFINE_enum('suite', 'pipeline', ['pipeline', 'models', 'data_parallel',
                                        'accelerator_check'],
                  'What to measure.')
flags.DEFINE_string('json', None, 'Output JSON file (required but for '
                    'accelerator_check); the markdown table goes to the same '
                    'path with .md appended.')
flags.DEFINE_string('out_dir', None, 'accelerator_check: folder for '
                    'accelerator_check.json and .md (required).')
flags.DEFINE_bool('small', False, 'accelerator_check: tiny sizes and step '
                  'counts (runs end to end on a CPU).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'models / data_parallel / pipeline: compute dtype of the '
                  'FCN / CNN layers (parameters stay float32); the LSTM runs '
                  'in float32 only.')
flags.DEFINE_integer('profile_steps', 0,
                     'models / accelerator_check: N > 0 writes a '
                     'jax.profiler trace of N steps of every fused row into '
                     'profile/ beside the output.')
flags.DEFINE_integer('processes', None,
                     'pipeline: one worker process per stage, each pinned to '
                     'its own CPU core (CPU hosts; at most the core count).')
flags.DEFINE_integer('num_devices', None,
                     'pipeline: stages over this many devices of this '
                     'process; data_parallel: measure 1..N devices. On CPU '
                     'this many fake devices are created.')
flags.DEFINE_integer('batch_size', 256, 'Batch size.')
flags.DEFINE_integer('num_layers', 6,
                     'pipeline: layers of the cDNI FCN (hidden + classifier).')
flags.DEFINE_integer('hidden_size', 256, 'pipeline: units per hidden layer.')
flags.DEFINE_integer('microbatches', 4,
                     'pipeline: micro-batches of the backprop pipeline.')
flags.DEFINE_integer('steps_per_call', 1,
                     'pipeline: training steps (pipeline ticks) per '
                     'dispatched call, the same for all three ways (K > 1: '
                     'a lax.scan over K batches).')
flags.DEFINE_enum('balance', 'measured', ['measured', 'flops'],
                  'pipeline: place the stage boundaries by measured times on '
                  'this device (two stages: every split\'s stages timed, the '
                  'one with the fastest slower stage kept; more: per-layer '
                  'update times balanced), or by multiply-add counts.')
flags.DEFINE_list('models', ['fcn', 'cnn', 'lstm'],
                  'models / data_parallel: fcn, cnn (MNIST sizes, A.1), lstm '
                  '(PTB sizes, A.3).')
flags.DEFINE_list('methods', ['bprop', 'dni', 'cdni'],
                  'models: bprop, dni, cdni (feed-forward), dni_aux (LSTM); '
                  'for the LSTM bprop is truncated BPTT. Methods that do not '
                  'apply to a model are skipped.')
flags.DEFINE_integer('unroll', 5, 'models / data_parallel: T of the LSTM '
                     '(A.3: 2..8).')
flags.DEFINE_integer('warmup', 5, 'Steps before timing.')
flags.DEFINE_integer('steps', 30, 'Timed steps (the median is reported).')
flags.DEFINE_string('workdir', None,
                    'pipeline --processes: folder for the workers\' files '
                    '(default: a temporary folder).')
FLAGS = flags.FLAGS


def _fail(message: str) -> None:
  print(f'benchmark.py: error: {message}', file=sys.stderr)
  sys.exit(1)


def _validate() -> None:
  if FLAGS.profile_steps < 0:
    _fail(f'--profile_steps={FLAGS.profile_steps}: must be >= 0')
  if FLAGS.profile_steps and FLAGS.suite not in ('models',
                                                 'accelerator_check'):
    _fail(f'--profile_steps is for --suite=models or accelerator_check, not '
          f'--suite={FLAGS.suite}')
  if FLAGS.suite == 'accelerator_check':
    if not FLAGS.out_dir:
      _fail('--suite=accelerator_check needs --out_dir')
    if FLAGS.processes is not None:
      _fail('--processes is for --suite=pipeline, not '
            '--suite=accelerator_check')
    return
  if FLAGS.small:
    _fail(f'--small is for --suite=accelerator_check, not '
          f'--suite={FLAGS.suite}')
  if not FLAGS.json:
    _fail('--json is required')
  for name in ('batch_size', 'warmup', 'steps', 'microbatches', 'hidden_size',
               'steps_per_call'):
    if getattr(FLAGS, name) < 1 and not (name == 'warmup' and
                                         FLAGS.warmup == 0):
      _fail(f'--{name}={getattr(FLAGS, name)}: must be a positive integer')
  if FLAGS.suite == 'pipeline':
    if (FLAGS.processes is None) == (FLAGS.num_devices is None):
      _fail('--suite=pipeline needs exactly one of --processes (pinned CPU '
            'processes) or --num_devices (devices of this process)')
    n = FLAGS.processes or FLAGS.num_devices
    if not 2 <= n <= FLAGS.num_layers:
      _fail(f'--{"processes" if FLAGS.processes else "num_devices"}={n}: '
            f'must be in 2..--num_layers={FLAGS.num_layers} (one stage each)')
    if FLAGS.processes and FLAGS.processes > len(os.sched_getaffinity(0)):
      _fail(f'--processes={FLAGS.processes}: exceeds the '
            f'{len(os.sched_getaffinity(0))} available cores')
    if FLAGS.batch_size % FLAGS.microbatches:
      _fail(f'--microbatches={FLAGS.microbatches}: must divide --batch_size='
            f'{FLAGS.batch_size}')
  else:
    if FLAGS.processes is not None:
      _fail(f'--processes is for --suite=pipeline, not --suite={FLAGS.suite}')
    models = ('fcn', 'cnn', 'lstm')
    bad = [m for m in FLAGS.models if m not in models]
    if bad or not FLAGS.models:
      _fail(f'--models={",".join(FLAGS.models)}: must be among '
            f'{", ".join(models)}')
    methods = ('bprop', 'dni', 'cdni', 'dni_aux')
    bad = [m for m in FLAGS.methods if m not in methods]
    if bad or not FLAGS.methods:
      _fail(f'--methods={",".join(FLAGS.methods)}: must be among '
            f'{", ".join(methods)}')
    from dni_jax.benchmarking import METHODS   # No backend started yet.
    if not any(m in METHODS[model] for model in FLAGS.models
               for m in FLAGS.methods):
      _fail(f'--models={",".join(FLAGS.models)} --methods='
            f'{",".join(FLAGS.methods)}: no method applies to these models')
    if FLAGS.unroll < 1:
      _fail(f'--unroll={FLAGS.unroll}: must be a positive integer')
    if FLAGS.dtype != 'float32' and 'lstm' in FLAGS.models:
      _fail(f'--dtype={FLAGS.dtype}: the recurrent rows (lstm) run in '
            'float32 only; leave lstm out of --models')
  if FLAGS.num_devices is not None and FLAGS.num_devices < 1:
    _fail(f'--num_devices={FLAGS.num_devices}: must be >= 1')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected argument(s): {" ".join(argv[1:])} (flags are written '
          '--name=value; see --help)')
  _validate()
  import jax
  if FLAGS.num_devices:
    # Only the CPU backend reads this; accelerators use their real devices.
    jax.config.update('jax_num_cpu_devices', FLAGS.num_devices)
  from dni_jax import benchmarking as bm

  load_before = bm.load_average()
  if FLAGS.suite == 'accelerator_check':
    from dni_jax import accelerator_check
    accelerator_check.run(FLAGS.out_dir, FLAGS.small, FLAGS.profile_steps)
    with open(os.path.join(FLAGS.out_dir, 'accelerator_check.md')) as f:
      print(f.read())
    return
  if FLAGS.suite == 'pipeline':
    spec = {'mode': 'pipelines', 'input_shape': [28, 28, 1],
            'dtype': FLAGS.dtype,
            'num_layers': FLAGS.num_layers, 'hidden_size': FLAGS.hidden_size,
            'batch_size': FLAGS.batch_size,
            'num_stages': FLAGS.processes or FLAGS.num_devices,
            'microbatches': FLAGS.microbatches, 'warmup': FLAGS.warmup,
            'steps': FLAGS.steps, 'balance': FLAGS.balance,
            'steps_per_call': FLAGS.steps_per_call}
    if FLAGS.processes:
      workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='dni_pipeline_')
      core = sorted(os.sched_getaffinity(0))[0]
      baseline = bm.run_single_process(dict(spec, mode='baseline'), workdir,
                                       core)
      spec['boundaries'] = baseline['boundaries']
      workers = bm.launch_workers(FLAGS.processes, spec, workdir)
      result = bm.summarize_pipeline(spec, baseline, workers, 'processes')
      result['device'] = {'backend': 'cpu', 'num_devices': FLAGS.processes,
                          'num_processes': FLAGS.processes,
                          'cores_per_process': 1,
                          'cpu_cores': os.cpu_count()}
    else:
      if jax.device_count() < FLAGS.num_devices:
        _fail(f'--num_devices={FLAGS.num_devices}: only '
              f'{jax.device_count()} devices')
      baseline = bm.run_baseline(spec)
      spec['boundaries'] = baseline['boundaries']
      workers = [bm.run_pipelines(spec)]
      result = bm.summarize_pipeline(spec, baseline, workers, 'devices')
      result['device'] = bm.device_info()
    table = bm.pipeline_markdown(result)
  elif FLAGS.suite == 'models':
    from dni_jax import accelerator_check
    from dni_jax import bench_metrics
    peak, source = bench_metrics.peak_for(FLAGS.dtype)
    settings = bm.RowSettings(
        FLAGS.batch_size, FLAGS.warmup, FLAGS.steps, FLAGS.dtype, peak,
        FLAGS.profile_steps,
        os.path.join(os.path.dirname(os.path.abspath(FLAGS.json)), 'profile'))
    rows = bm.run_models_suite(FLAGS.models, FLAGS.methods, settings,
                               overrides={'lstm': {'unroll': FLAGS.unroll}})
    result = {'suite': 'models', 'dtype': FLAGS.dtype,
              'peak_flops_per_s': peak, 'peak_source': source,
              'device': bm.device_info(), 'rows': rows,
              'warmup': FLAGS.warmup, 'steps': FLAGS.steps}
    table = bm.markdown_table(rows, accelerator_check.MODEL_COLUMNS)
    table += ('\nPeak: ' + (f'{peak / 1e9:.4g} GFLOP/s' if peak else 'n/a')
              + f' ({source}).\n')
  else:
    counts = range(1, (FLAGS.num_devices or jax.local_device_count()) + 1)
    counts = [n for n in counts if FLAGS.batch_size % n == 0]
    rows = []
    for model in FLAGS.models:
      for method in FLAGS.methods:
        if method in bm.METHODS[model]:
          rows += bm.run_data_parallel_suite(
              model, method, counts, FLAGS.batch_size, FLAGS.warmup,
              FLAGS.steps, overrides=({'unroll': FLAGS.unroll}
                                      if model == 'lstm' else None),
              dtype=FLAGS.dtype)
    result = {'suite': 'data_parallel', 'device': bm.device_info(),
              'rows': rows, 'warmup': FLAGS.warmup, 'steps': FLAGS.steps}
    from dni_jax import accelerator_check
    table = bm.markdown_table(rows, accelerator_check.DP_COLUMNS)
  result['load_average_before'] = load_before
  result['load_average_after'] = bm.load_average()
  result['command'] = ' '.join(['python', 'scripts/benchmark.py']
                               + sys.argv[1:])
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
  with open(FLAGS.json, 'w') as f:
    json.dump(result, f, indent=1)
  with open(FLAGS.json + '.md', 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  app.run(main)

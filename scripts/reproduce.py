r"""Runs one of the paper's feed-forward experiments as a grid of train_ff runs.

  python scripts/reproduce.py --experiment=table1_mnist_fcn \
      --data_dir=PATH/mnist --out=runs/table1 --num_steps=3000 --learning_rate=3e-4

Every run gets the same reduced schedule: NUM_STEPS steps, the learning rate
multiplied by 0.1 at 60% and 80% of them (the shape of the paper's 500k-step
schedule, x0.1 at 300k and 400k). Runs are resumable: rerunning skips finished
runs and resumes interrupted ones. Writes OUT/report.md and PNG plots.
"""

import os

from absl import app
from absl import flags
from absl import logging

from dni_jax import cli
from dni_jax import experiments
from dni_jax import reporting

EXPERIMENTS = ('table1_mnist_fcn', 'table1_mnist_cnn', 'table1_cifar10_fcn',
               'table1_cifar10_cnn', 'stale_baseline', 'fig9a_single_dni', 'fig5_sparse',
               'fig5_unlock')
TABLE1_METHODS = ('no_bprop', 'bprop', 'dni', 'cdni')
flags.DEFINE_enum('experiment', None, list(EXPERIMENTS), 'Which grid to run.')
flags.DEFINE_string('data_dir', None,
                    'Folder with the MNIST IDX files, or (table1_cifar_*) '
                    'the one holding cifar-10-batches-bin/.')
flags.DEFINE_string('out', None, 'Folder for the workdirs and the report.')
flags.DEFINE_integer('num_steps', 3000, 'Steps per run.')
flags.DEFINE_float('learning_rate', 3e-4, 'Initial Adam learning rate.')
flags.DEFINE_integer('batch_size', 256, 'Batch size of every run.')
flags.DEFINE_list('num_layers', [],
                  'Only the runs of these depths (default: all of the grid).')
flags.DEFINE_list('methods', [],
                  'Only the runs of these methods (default: all of the grid), '
                  'e.g. to split a grid over several processes.')
flags.DEFINE_integer('eval_every', None,
                     'Evaluate every N steps (and at the end); default '
                     'num_steps / 10. Fewer evaluations save time where a '
                     'test-set pass is slow (CNNs on a CPU).')
flags.DEFINE_integer('seed', 0, 'Seed of every run.')
FLAGS = flags.FLAGS


def grid(name: str) -> list[dict]:
  """(workdir name, settings) of every run of an experiment."""
  if name == 'table1_mnist_fcn':   # Table 1, MNIST FCN rows.
    return [dict(name=f'fcn{n}_{m}', num_layers=n, method=m)
            for n in (3, 4, 5, 6) for m in TABLE1_METHODS]
  if name == 'table1_mnist_cnn':   # Table 1, MNIST CNN rows (64 filters).
    return [dict(name=f'cnn{n}_{m}', model='cnn', num_layers=n, method=m)
            for n in (3, 4) for m in TABLE1_METHODS]
  if name == 'table1_cifar10_fcn':   # Table 1, CIFAR-10 FCN rows (A.1 sizes).
    return [dict(name=f'fcn{n}_{m}', dataset='cifar10', num_layers=n,
                 method=m, hidden_size=1000,
                 **({'sg_hidden_layers': 1, 'sg_hidden_size': 4000}
                    if m in ('dni', 'cdni') else {}))
            for n in (3, 4, 5, 6) for m in TABLE1_METHODS]
  if name == 'table1_cifar10_cnn':   # Table 1, CIFAR-10 CNN rows (128 filters).
    return [dict(name=f'cnn{n}_{m}', dataset='cifar10', model='cnn',
                 num_layers=n, method=m, hidden_size=128)
            for n in (3, 4) for m in TABLE1_METHODS]
  if name == 'stale_baseline':   # Sec. 3.1: historical gradients.
    return [dict(name=f'fcn{n}_stale_decay{d:g}', num_layers=n,
                 method='stale', stale_decay=d)
            for n in (3, 4, 5, 6) for d in (0.0, 0.9, 0.99, 0.999)]
  if name == 'fig5_sparse':   # Fig. 5 left: 4-layer FCN, sparse updates.
    return [dict(name=f'fcn4_{m}_p{p}', num_layers=4, method=m, p_update=p)
            for m in ('dni', 'cdni') for p in (1.0, 0.5, 0.2)]
  if name == 'fig5_unlock':   # Fig. 5 right: complete unlock, 4-layer FCN.
    return [dict(name=f'fcn4_{m}_unlock_p{p}', num_layers=4, method=m,
                 synthetic_inputs=True, p_update=p)
            for m, p in (('dni', 1.0), ('cdni', 1.0), ('cdni', 0.5))]
  # Fig. 9a: a 6-layer FCN with a single DNI (or a single cut with no
  # gradient) after layer k; Bprop for reference.
  runs = [dict(name='fcn6_bprop', num_layers=6, method='bprop')]
  for method in ('dni', 'no_bprop'):
    runs += [dict(name=f'fcn6_{method}_at{k}', num_layers=6, method=method,
                  dni_layers=(k,)) for k in range(1, 6)]
  return runs


def select(experiment: str, num_layers: list[str],
           methods: list[str]) -> list[dict]:
  """The runs of a grid at the given depths and methods (empty: all)."""
  runs = grid(experiment)
  if num_layers:
    try:
      depths = {int(n) for n in num_layers}
    except ValueError:
      raise ValueError(f'--num_layers={",".join(num_layers)}: must be '
                       'a comma-separated list of integers') from None
    runs = [r for r in runs if r['num_layers'] in depths]
    if not runs:
      raise ValueError(f'--num_layers={",".join(num_layers)}: no run '
                       f'of --experiment={experiment} has that depth')
  if methods:
    known = sorted({r['method'] for r in grid(experiment)})
    unknown = [m for m in methods if m not in known]
    if unknown:
      raise ValueError(f'--methods={",".join(methods)}: {",".join(unknown)} '
                       f'not in --experiment={experiment} (its methods: '
                       f'{",".join(known)})')
    runs = [r for r in runs if r['method'] in methods]
    if not runs:
      raise ValueError(f'--methods={",".join(methods)}: no run of '
                       f'--experiment={experiment} at the chosen depths')
  return runs


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors('reproduce.py'):
    for flag in ('experiment', 'data_dir', 'out'):
      if not getattr(FLAGS, flag):
        raise ValueError(f'--{flag} is required')
    if FLAGS.num_steps < 10:
      raise ValueError(f'--num_steps={FLAGS.num_steps}: must be >= 10')
    steps = FLAGS.num_steps
    eval_every = (steps // 10 if FLAGS.eval_every is None
                  else FLAGS.eval_every)
    if not 1 <= eval_every <= steps:
      raise ValueError(f'--eval_every={FLAGS.eval_every}: must be in '
                       f'[1, --num_steps={steps}]')
    runs = select(FLAGS.experiment, FLAGS.num_layers, FLAGS.methods)
    workdirs = []
    for run in runs:
      workdir = os.path.join(FLAGS.out, run.pop('name'))
      workdirs.append(workdir)
      logging.info('=== %s', workdir)
      run.setdefault('dataset', 'mnist')
      experiments.train_feedforward(experiments.FeedForwardExperiment(
          workdir=workdir, data_dir=FLAGS.data_dir,
          batch_size=FLAGS.batch_size,
          learning_rate=FLAGS.learning_rate,
          lr_boundaries=(steps * 6 // 10, steps * 8 // 10),
          num_steps=steps, eval_every=eval_every, log_every=steps // 10,
          checkpoint_every=steps, seed=FLAGS.seed, **run))
  runs = [reporting.load_run(w) for w in workdirs]
  if FLAGS.experiment.startswith('table1_'):
    report = reporting.feedforward_table(runs, FLAGS.experiment[7:])
  elif FLAGS.experiment == 'stale_baseline':
    report = reporting.stale_table(runs)
  elif FLAGS.experiment == 'fig5_sparse':
    report = reporting.sparse_table(runs)
  elif FLAGS.experiment == 'fig5_unlock':
    report = reporting.runs_table(runs)
  else:
    report = reporting.single_dni_table(runs)
    reporting.plot_diagnostics(
        [r for r in runs if r.config['method'] == 'dni'],
        os.path.join(FLAGS.out, 'diagnostics.png'))
  reporting.plot_learning_curves(runs, os.path.join(FLAGS.out, 'curves.png'))
  with open(os.path.join(FLAGS.out, 'report.md'), 'w') as f:
    f.write(report + '\n')
  print(report)


if __name__ == '__main__':
  app.run(main)

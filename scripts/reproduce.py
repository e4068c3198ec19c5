r"""Runs one of the paper's feed-forward experiments as a grid of train_ff runs.

  python scripts/reproduce.py --experiment=table1_mnist_fcn \
      --data_dir=PATH/mnist --out=runs/table1 --num_steps=3000 --learning_rate=3e-4

Every run gets the same reduced schedule: NUM_STEPS steps, the learning rate
multiplied by 0.1 at 60% and 80% of them (the shape of the paper's 500k-step
schedule, x0.1 at 300k and 400k). Runs are resumable: rerunning skips finished
runs and resumes interrupted ones. Writes OUT/report.md and PNG plots.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from dni_jax import experiments
from dni_jax import reporting
from dni_jax import training

EXPERIMENTS = ('table1_mnist_fcn', 'fig9a_single_dni', 'fig5_sparse',
               'fig5_unlock')
flags.DEFINE_enum('experiment', None, list(EXPERIMENTS), 'Which grid to run.')
flags.DEFINE_string('data_dir', None, 'Folder with the MNIST IDX files.')
flags.DEFINE_string('out', None, 'Folder for the workdirs and the report.')
flags.DEFINE_integer('num_steps', 3000, 'Steps per run.')
flags.DEFINE_float('learning_rate', 3e-4, 'Initial Adam learning rate.')
flags.DEFINE_integer('seed', 0, 'Seed of every run.')
FLAGS = flags.FLAGS


def grid(name: str) -> list[dict]:
  """(workdir name, settings) of every run of an experiment."""
  if name == 'table1_mnist_fcn':   # Table 1, MNIST FCN rows.
    return [dict(name=f'fcn{n}_{m}', num_layers=n, method=m)
            for n in (3, 4, 5, 6) for m in reporting.METHOD_ORDER]
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


def main(argv):
  del argv
  try:
    for flag in ('experiment', 'data_dir', 'out'):
      if not getattr(FLAGS, flag):
        raise ValueError(f'--{flag} is required')
    if FLAGS.num_steps < 10:
      raise ValueError(f'--num_steps={FLAGS.num_steps}: must be >= 10')
    steps = FLAGS.num_steps
    workdirs = []
    for run in grid(FLAGS.experiment):
      workdir = os.path.join(FLAGS.out, run.pop('name'))
      workdirs.append(workdir)
      logging.info('=== %s', workdir)
      experiments.train_feedforward(experiments.FeedForwardExperiment(
          workdir=workdir, dataset='mnist', data_dir=FLAGS.data_dir,
          learning_rate=FLAGS.learning_rate,
          lr_boundaries=(steps * 6 // 10, steps * 8 // 10),
          num_steps=steps, eval_every=steps // 10, log_every=steps // 10,
          checkpoint_every=steps, seed=FLAGS.seed, **run))
  except (ValueError, training.TrainingError) as e:
    print(f'reproduce.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  runs = [reporting.load_run(w) for w in workdirs]
  if FLAGS.experiment == 'table1_mnist_fcn':
    report = reporting.feedforward_table(runs, 'mnist_fcn')
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

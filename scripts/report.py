r"""Markdown table and learning-curve PNG from dni_jax workdirs.

  python scripts/report.py --paper_table=mnist_fcn --plot=curves.png RUNS/*
"""

from absl import app
from absl import flags

from dni_jax import cli
from dni_jax import reporting

flags.DEFINE_enum('paper_table', None, list(reporting.PAPER_TABLE1),
                  "Put this block of the paper's Table 1 beside ours.")
flags.DEFINE_string('plot', None, 'Write test-error curves to this PNG.')
FLAGS = flags.FLAGS


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    cli.fail('report.py', 'give at least one workdir')
  with cli.one_line_errors('report.py', extra=(OSError,)):
    runs = [reporting.load_run(w) for w in workdirs]
    for run in runs:
      if 'num_layers' not in run.config or 'method' not in run.config:
        kind = ('a train_rnn.py run: use scripts/plot_rnn.py'
                if 'task' in run.config else
                'a train_multinet.py run: use scripts/plot_multinet.py'
                if 'tick' in run.config else 'not a train_ff.py run')
        raise ValueError(f'{run.workdir}: {kind} (report.py reads '
                         'train_ff.py workdirs)')
  print(reporting.feedforward_table(runs, FLAGS.paper_table))
  if FLAGS.plot:
    reporting.plot_learning_curves(runs, FLAGS.plot)
    print(f'\nwrote {FLAGS.plot}')


if __name__ == '__main__':
  app.run(main)

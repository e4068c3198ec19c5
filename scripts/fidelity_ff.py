r"""Fidelity of the feed-forward claims: ground-truth diagnostics.

Trains feed-forward networks over a grid (methods x depths x learning rates x
step budgets x seeds) and, at every evaluation, compares each interface's
gradient signals with the true backpropagated gradient at the same parameters
(`dni_jax.fidelity.ff_diagnostics`): the synthetic gradient, its bootstrapped
target and the parameter update they cause.

Cosines are reported as the mean per-example cosine (what train_ff.py logs as
sg_cosine), the same over the top decile of examples by loss ("hi"), and pooled
(the cosine of the whole [B, D] arrays, which weights examples by their
gradient norms). Probes are fixed batches of training and test images.

Each run is resumable (orbax checkpoint of the state and the rows so far at
every evaluation, under WORKDIR/RUN/); finished runs are skipped. The summary
(every run's rows) goes to --summary_json and a plot to --plot.

Example (4-layer MNIST FCN, DNI vs Bprop, 3 seeds):
  python scripts/fidelity_ff.py --workdir=/tmp/fid --data_dir=PATH/mnist \
      --methods=bprop,dni --num_layers=4 --seeds=0,1,2 --learning_rates=3e-4 \
      --num_steps=3000 --summary_json=docs/fidelity_ff.json \
      --plot=docs/fidelity_ff.png
"""

from absl import app
from absl import flags

from dni_jax import cli
from dni_jax import data
from dni_jax import feedforward
from dni_jax.fidelity import ff

FLAGS = flags.FLAGS
PROG = 'fidelity_ff.py'


def define_flags() -> None:
  """The script's flags (defined when run: importing the script defines
  none, so it can be loaded beside other scripts' flags)."""
  flags.DEFINE_string('workdir', None, 'Output folder of the runs (required).')
  flags.DEFINE_enum('dataset', 'mnist', list(data.DATASETS), 'Dataset.')
  flags.DEFINE_enum('model', 'fcn', list(feedforward.MODELS),
                    'fcn or cnn (A.1 sizes by default).')
  flags.DEFINE_bool('cost_only', False,
                    'Train nothing: print XLA\'s FLOP count of one fused '
                    'training step of each configuration, and the total of '
                    'each --num_steps budget (what a GPU run would cost).')
  flags.DEFINE_string('data_dir', None, 'IDX files / cifar-10-batches-bin/.')
  flags.DEFINE_list('methods', ['bprop', 'dni'],
                    'Methods (bprop, no_bprop, dni, cdni, stale).')
  flags.DEFINE_list('num_layers', ['4'],
                    'Depths (hidden layers + classifier).')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.DEFINE_list('learning_rates', ['3e-4'], 'Adam learning rates.')
  flags.DEFINE_list('num_steps', ['3000'], 'Step budgets (one run each).')
  flags.DEFINE_enum('lr_schedule', 'step', ['step', 'constant'],
                    'step: x0.1 at 60% and 80% of the run (A.1\'s shape); '
                    'constant: no decay.')
  flags.DEFINE_list('stale_decays', ['0.0'],
                    '--methods=stale: decays of the moving average, one run '
                    'each.')
  flags.DEFINE_integer('hidden_size', None, 'Units per hidden layer (A.1).')
  flags.DEFINE_integer('sg_hidden_layers', None,
                       'SG model hidden layers (A.1).')
  flags.DEFINE_integer('sg_hidden_size', None, 'SG model units (A.1).')
  flags.DEFINE_integer('batch_size', 256, 'Batch size.')
  flags.DEFINE_integer('num_evals', 10, 'Evaluations per run (evenly spaced).')
  flags.DEFINE_integer('probe_size', 512,
                       'Examples in each fixed diagnostic probe (train, test).')
  flags.DEFINE_float('top_fraction', 0.1,
                     'Fraction of highest-loss probe examples for the "hi" '
                     'cosines.')
  flags.DEFINE_integer('train_limit', None,
                       'Use only the first N training examples (tests).')
  flags.DEFINE_string('summary_json', None, 'Write all runs\' rows here.')
  flags.DEFINE_string('plot', None, 'Write a PNG of the diagnostics here.')



main = cli.script_main(PROG, lambda: ff.run_grid(FLAGS))


if __name__ == '__main__':
  define_flags()
  app.run(main)

r"""Trains the two-network system of Sec. 3.3 / A.4 (Fig. 8).

Network A reads one MNIST digit per step and every T steps says how many odd
digits it saw in those T steps; Network B ticks every T steps, reads A's
message and says how many 3s were among the last T^2 digits.

  python scripts/train_multinet.py --mode=dni --tick=4 --learning_rate=1e-4 \
      --num_steps=20000 --data_dir=/path/to/mnist --workdir=/tmp/multinet_dni

--mode: bprop (one graph of T^2 steps, one update of both every T^2 steps),
dni (A updates every T steps on sg_scale * M(message); B every T ticks, and
trains M to its true message gradients), no_bprop (A gets no gradient from
B); the older names backprop and decoupled are accepted. A step is one time
step of A (one digit per stream).
"""

from absl import app
from absl import flags
from absl import logging

from dni_jax import cli
from dni_jax import methods
from dni_jax import multinet
from dni_jax import multinet_experiments

_D = multinet_experiments.MultinetExperiment
cli.define_workdir_flags()
flags.DEFINE_string('data_dir', None,
                    'Folder with the MNIST IDX files (train-images-idx3-ubyte'
                    '[.gz], ...); required.')
flags.DEFINE_enum('mode', _D.mode, methods.flag_values(multinet.MODES),
                  'bprop | dni | no_bprop (also spelt backprop, decoupled).')
flags.DEFINE_integer('tick', _D.tick, 'T: B ticks once every T steps of A.')
flags.DEFINE_float('sg_scale', None,
                   'Factor on the synthetic gradient backpropagated into A '
                   '(default 10, A.4); --mode=dni only.')
flags.DEFINE_float('learning_rate', _D.learning_rate,
                   'Adam learning rate of both networks and M (paper: 1e-5).')
flags.DEFINE_integer('batch_size', _D.batch_size, 'Digit streams per batch.')
flags.DEFINE_integer('hidden_size', _D.hidden_size,
                     'Width of the FCN layers, both LSTMs, the message and '
                     "M's hidden layer (A.4: 256).")
flags.DEFINE_integer('num_steps', _D.num_steps,
                     'Time steps of A to train for (a multiple of tick^2).')
flags.DEFINE_integer('eval_every', None,
                     'Evaluate every N steps (and at the end); a multiple of '
                     'tick^2, default 125 tick^2.')
flags.DEFINE_integer('log_every', None,
                     'Log progress every N steps; default 25 tick^2.')
flags.DEFINE_integer('checkpoint_every', None,
                     'Checkpoint every N steps (and at the end); default 625 '
                     'tick^2.')
flags.DEFINE_integer('eval_streams', _D.eval_streams,
                     'Test streams evaluated in parallel.')
flags.DEFINE_integer('eval_blocks', _D.eval_blocks,
                     'Blocks of tick^2 test steps scored per stream per '
                     'evaluation (after one unscored burn-in block).')
flags.DEFINE_integer('seed', _D.seed, 'Seed for initialisation and streams.')
FLAGS = flags.FLAGS


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors('train_multinet.py'):
    exp = cli.experiment_from_flags(
        multinet_experiments.MultinetExperiment, FLAGS)
    result = multinet_experiments.train_multinet(exp)
  logging.info('result: %s', result)
  print(f'A test error {result["a_test_error"]:.2f}% (best '
        f'{result["best_a_test_error"]:.2f}%)  B test error '
        f'{result["b_test_error"]:.2f}% (best {result["best_b_test_error"]:.2f}'
        f'%)  updates A {result["a_updates"]} B {result["b_updates"]}  '
        f'({FLAGS.workdir}/result.json)')


if __name__ == '__main__':
  app.run(main)

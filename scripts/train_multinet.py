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

from dni_jax import cli
from dni_jax import multinet_experiments
from dni_jax import settings

cli.define_workdir_flags()
# One flag per setting, declared (default, help) in MultinetExperiment.
settings.define_flags(multinet_experiments.MultinetExperiment)
FLAGS = flags.FLAGS


def summary(exp: multinet_experiments.MultinetExperiment,
            result: dict) -> str:
  return (f'A test error {result["a_test_error"]:.2f}% (best '
          f'{result["best_a_test_error"]:.2f}%)  B test error '
          f'{result["b_test_error"]:.2f}% (best '
          f'{result["best_b_test_error"]:.2f}%)  updates A '
          f'{result["a_updates"]} B {result["b_updates"]}  '
          f'({exp.workdir}/result.json)')


main = cli.training_main(
    'train_multinet.py', multinet_experiments.MultinetExperiment,
    multinet_experiments.train_multinet, summary)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('train_multinet.py'))

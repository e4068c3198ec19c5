r"""Trains a feed-forward network with DNI between every layer (Sec. 3.1, A.1).

Example (Table 1, MNIST, 4-layer FCN, cDNI):
  python scripts/train_ff.py --dataset=mnist --data_dir=PATH/mnist \
      --num_layers=4 --method=cdni --workdir=/tmp/cdni4

The same run from its experiment file (dni_jax/configs/), with overrides:
  python scripts/train_ff.py \
      --config=dni_jax/configs/table1.py:mnist_fcn4_cdni \
      --data_dir=PATH/mnist --workdir=/tmp/cdni4 --config.loop.num_steps=1000

Precedence: the defaults < the --config file < its --config.SECTION.NAME
overrides < the flags of the settings' names (--num_layers=5); one setting
given both ways is refused.
"""

import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from dni_jax import cli
from dni_jax import configs
from dni_jax import experiments
from dni_jax import ff_experiment
from dni_jax import settings

_PROG = 'train_ff.py'
cli.define_workdir_flags()
settings.define_flags(ff_experiment.FeedForwardExperiment)
# config_flags reads the --config.SECTION.NAME overrides from sys.argv, and
# applies them to the default config as the flag is defined.
cli.check_config_overrides(
    _PROG, 'config', settings.config_paths(ff_experiment.FeedForwardExperiment))
with cli.flag_errors(_PROG, 'config'):
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(configs.__file__), 'default.py'),
      'Experiment file, FILE.py:RUN (e.g. dni_jax/configs/table1.py:'
      'mnist_fcn4_cdni); its settings are overridden by '
      '--config.SECTION.NAME and by the flags of the same names. Default: '
      'the defaults of those flags.')
FLAGS = flags.FLAGS


def train(exp: ff_experiment.FeedForwardExperiment) -> dict:
  if exp.pipeline:
    # Only the CPU backend reads this: one fake CPU device per stage.
    jax.config.update('jax_num_cpu_devices', len(exp.pipeline_boundaries) + 1)
  return experiments.train_feedforward(exp)


def summary(exp: ff_experiment.FeedForwardExperiment, result: dict) -> str:
  return (f'test_error {result["test_error"]:.2f}%  best '
          f'{result["best_test_error"]:.2f}%  ({exp.workdir}/result.json)')


main = cli.training_main(_PROG, ff_experiment.FeedForwardExperiment, train,
                         summary, config_flag='config')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_PROG, 'config'))

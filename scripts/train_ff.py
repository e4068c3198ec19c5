r"""Trains a feed-forward network with DNI between every layer (Sec. 3.1, A.1).

Example (Table 1, MNIST, 4-layer FCN, cDNI):
  python scripts/train_ff.py --dataset=mnist --data_dir=PATH/mnist \
      --num_layers=4 --method=cdni --workdir=/tmp/cdni4
"""

from absl import app
from absl import flags
from absl import logging
import jax

from dni_jax import cli
from dni_jax import data
from dni_jax import experiments
from dni_jax import feedforward

_D = experiments.FeedForwardExperiment
cli.define_workdir_flags()
flags.DEFINE_enum('dataset', _D.dataset, list(data.DATASETS), 'Dataset.')
flags.DEFINE_string('data_dir', None,
                    'Folder with the IDX files (MNIST, Fashion-MNIST) or '
                    'cifar-10-batches-bin/; for --data_source=tfds, the TFDS '
                    'data_dir. Fashion-MNIST defaults to the Debian package '
                    'folder ' + data.FASHION_MNIST_DEBIAN_DIR + '.')
flags.DEFINE_enum('data_source', _D.data_source, ['files', 'tfds'],
                  'Read local files, or use tensorflow-datasets.')
flags.DEFINE_enum('model', _D.model, list(feedforward.MODELS),
                  'fcn: linear -> BatchNorm -> ReLU layers; cnn: 5x5 conv -> '
                  'BatchNorm -> ReLU -> 3x3 pooling (max first, then avg).')
flags.DEFINE_integer('num_layers', _D.num_layers,
                     'Layers counted as in the paper: hidden layers + the '
                     'classifier (4 layers = 3 DNIs).')
flags.DEFINE_integer('hidden_size', None,
                     'Units (fcn) or filters (cnn) per hidden layer; default '
                     'as in A.1: 256 units, 64 filters (use 128 for CIFAR-10 '
                     'CNNs, 1000 for CIFAR-10 FCNs).')
flags.DEFINE_enum('method', _D.method, list(feedforward.METHODS),
                  'bprop | no_bprop | dni | cdni (label-conditioned DNI) | '
                  'stale (Sec. 3.1 baseline: a moving average of past '
                  'gradients in place of the synthetic gradient).')
flags.DEFINE_list('dni_layers', None,
                  'Put a DNI only after these layers (1-based; 3 = between '
                  'layers 3 and 4), backprop elsewhere (Fig. 9). Default: '
                  'after every hidden layer. Empty: none.')
flags.DEFINE_float('p_update', _D.p_update,
                   'Sparse updates (Fig. 5 left): after each forward pass, '
                   'each block (each layer, with DNI everywhere) does its '
                   'backward pass and update with this probability.')
flags.DEFINE_bool('synthetic_inputs', _D.synthetic_inputs,
                  'Complete unlock (Fig. 5 right, Fig. 6): every layer above '
                  'the first reads a synthetic input predicted from the data '
                  '(one-hidden-layer model), so no layer waits for another; '
                  'with --p_update, a busy layer does neither pass. Test time '
                  'connects the real layers.')
flags.DEFINE_float('stale_decay', _D.stale_decay,
                   '--method=stale: decay of the moving average of past '
                   'gradients, in [0, 1); 0 uses the previous step\'s.')
flags.DEFINE_integer('sg_hidden_layers', None,
                     'Hidden layers of each synthetic-gradient MLP (0-2); '
                     'default as in A.1: 2, except 0 for fcn cdni and 1 with '
                     '--synthetic_inputs.')
flags.DEFINE_integer('sg_hidden_size', None,
                     'Units (fcn) or filters (cnn) per synthetic-gradient '
                     'hidden layer; default as in A.1: 1024 units, or as many '
                     'filters as the layers (4000 for CIFAR-10 FCNs).')
flags.DEFINE_float('learning_rate', _D.learning_rate, 'Adam learning rate.')
flags.DEFINE_list('lr_boundaries', [str(b) for b in _D.lr_boundaries],
                  'Steps at which the learning rate is multiplied by '
                  '--lr_decay (empty: constant).')
flags.DEFINE_float('lr_decay', _D.lr_decay, 'Factor applied at each boundary.')
flags.DEFINE_integer('batch_size', _D.batch_size, 'Batch size.')
flags.DEFINE_integer('num_steps', _D.num_steps, 'Training steps.')
flags.DEFINE_integer('eval_every', _D.eval_every,
                     'Evaluate on the test set every N steps (and at the end).')
flags.DEFINE_integer('log_every', _D.log_every, 'Log progress every N steps.')
flags.DEFINE_integer('checkpoint_every', _D.checkpoint_every,
                     'Checkpoint every N steps (and at the end).')
flags.DEFINE_integer('seed', _D.seed, 'Seed for initialisation and data order.')
flags.DEFINE_integer('num_devices', None,
                     'Data parallelism: split each batch over this many local '
                     'devices (default: all; --batch_size must divide over '
                     'all devices of all processes).')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-process run: host:port of process 0 for '
                    'jax.distributed.initialize, or "auto" to detect the '
                    'cluster (Cloud TPU, SLURM, ...). Default: one process.')
flags.DEFINE_integer('num_processes', None,
                     'Multi-process run: number of processes (default: '
                     'detected by JAX).')
flags.DEFINE_integer('process_id', None,
                     'Multi-process run: this process, 0..num_processes-1 '
                     '(default: detected by JAX). Process 0 writes the '
                     'workdir files; all processes write checkpoints.')
flags.DEFINE_enum('pipeline', '', ['', 'dni', 'bprop'],
                  'Stages on different devices of this process (on a CPU '
                  'host: that many fake CPU devices, for correctness, not '
                  'speed): dni = the decoupled pipeline (--method=dni/cdni; '
                  'the stages are the blocks between DNIs), bprop = the GPipe '
                  'backprop pipeline (--method=bprop).')
flags.DEFINE_integer('pipeline_stages', None,
                     'Number of stages; the hidden layers are split as evenly '
                     'as possible (--pipeline=dni: these become the DNI '
                     'positions, so leave --dni_layers unset). Default for '
                     'dni: one stage per block.')
flags.DEFINE_enum('pipeline_programs', _D.pipeline_programs,
                  ['one', 'per_stage'],
                  '--pipeline=dni: one SPMD program over the stage devices '
                  '(zero placeholders of the other stages on each device) or '
                  'one jitted program per stage on its own device, '
                  'dispatched by the host (no placeholders); the same ticks.')
flags.DEFINE_integer('pipeline_microbatches', _D.pipeline_microbatches,
                     '--pipeline=bprop: micro-batches per batch.')
FLAGS = flags.FLAGS


def _int_list(flag: str, values: list[str]) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values if v.strip())
  except ValueError:
    raise ValueError(f'--{flag}={",".join(values)}: must be a comma-separated '
                     'list of integers') from None


# Flags whose values are not the experiment's: comma-separated lists.
CONVERT = {'dni_layers': lambda flag, v: None if v is None
           else _int_list(flag, v),
           'lr_boundaries': _int_list}


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors('train_ff.py'):
    exp = cli.experiment_from_flags(experiments.FeedForwardExperiment, FLAGS,
                                    convert=CONVERT)
    if exp.pipeline:
      # Only the CPU backend reads this: one fake CPU device per stage.
      jax.config.update('jax_num_cpu_devices',
                        len(exp.pipeline_boundaries) + 1)
    result = experiments.train_feedforward(exp)
  logging.info('result: %s', result)
  print(f'test_error {result["test_error"]:.2f}%  best {result["best_test_error"]:.2f}%  '
        f'({FLAGS.workdir}/result.json)')


if __name__ == '__main__':
  app.run(main)

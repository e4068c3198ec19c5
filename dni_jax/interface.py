"""The DNI communication protocol (Sec. 2, 2.1 of Jaderberg et al.), framework agnostic.

Gradient convention used throughout dni_jax: every gradient that crosses an
interface -- true, bootstrapped or synthetic -- is a *per-example* gradient

    delta_b = dl_b / dh_b = B * dL / dh_b,      L = (1/B) sum_b l_b,

so a synthetic-gradient model predicts a quantity whose scale does not depend on
the batch size. `pull_back` converts it to the gradient of the batch-mean loss
before updating parameters and converts the input gradient back.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dni_jax import losses

Array = jax.Array
VjpFn = Callable[[Array], tuple[Any, Array]]


def pull_back(vjp_fn: VjpFn, grad_h: Any, batch_size: int | None = None
              ) -> tuple[Any, Any]:
  """Eq. (1)/(2): pulls a per-example gradient of h back through a module.

  Args:
    vjp_fn: from `jax.vjp(f, params, x)` with `h = f(params, x)`.
    grad_h: per-example gradient w.r.t. h (true, bootstrapped or synthetic);
      an array [B, ...] or a pytree of them (e.g. an LSTM's (h, c)).
    batch_size: B; default: the leading axis of grad_h's first leaf.

  Returns:
    (gradient of the batch-mean loss w.r.t. params, per-example gradient w.r.t. x).
    The second is the *target* for the synthetic-gradient model that predicts
    the gradient of x (Fig. 2: delta_i = f'_{i+1}(h_i) delta_hat_{i+1}).
  """
  if batch_size is None:
    batch_size = jax.tree.leaves(grad_h)[0].shape[0]
  param_grads, grad_x = vjp_fn(jax.tree.map(lambda g: g / batch_size, grad_h))
  return param_grads, jax.tree.map(lambda g: g * batch_size, grad_x)


def synthetic_gradient_loss(prediction: Array, target: Array) -> Array:
  """L2 regression loss of a synthetic gradient to its target (Sec. 2.1, A.1).

  Mean over the batch of the squared Euclidean distance per example; the target
  is a constant (gradients never flow into it).
  """
  target = jax.lax.stop_gradient(target)
  sq = jnp.square(prediction - target).reshape(prediction.shape[0], -1)
  return jnp.mean(jnp.sum(sq, axis=-1))


# Mean softmax cross-entropy and its per-example gradient w.r.t. the logits.
softmax_cross_entropy_grad = losses.softmax_cross_entropy_grad



def gradient_diagnostics(synthetic: Array, true: Array) -> dict[str, Array]:
  """Fig. 10: L2 distance, cosine similarity and sign error (fraction of
  dimensions whose signs differ) between synthetic and true gradients, each
  averaged over the batch."""
  s = synthetic.reshape(synthetic.shape[0], -1)
  t = true.reshape(true.shape[0], -1)
  l2 = jnp.sqrt(jnp.sum(jnp.square(s - t), axis=-1))
  norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
  cosine = jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-30)
  sign_error = jnp.mean(jnp.sign(s) != jnp.sign(t), axis=-1)
  return {'l2_error': jnp.mean(l2), 'cosine': jnp.mean(cosine),
          'sign_error': jnp.mean(sign_error)}

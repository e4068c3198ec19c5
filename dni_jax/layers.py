"""Feed-forward building blocks (Sec. 3.1, A.1): Flax modules, no state on self."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class HiddenDense(nn.Module):
  """One FCN "layer" of the paper: linear -> batch-normalisation -> ReLU."""
  features: int

  @nn.compact
  def __call__(self, x_BxD: jax.Array, train: bool) -> jax.Array:
    x_BxD = x_BxD.reshape(x_BxD.shape[0], -1)
    # No bias: BatchNorm's offset replaces it (a bias before BN gets a zero
    # gradient, and Adam would turn its rounding noise into full-size steps).
    h = nn.Dense(self.features, use_bias=False)(x_BxD)
    h = nn.BatchNorm(use_running_average=not train)(h)
    return nn.relu(h)


class Classifier(nn.Module):
  """The final (N-th) layer: a linear classifier producing logits."""
  num_classes: int

  @nn.compact
  def __call__(self, x_BxD: jax.Array, train: bool) -> jax.Array:
    del train  # No batch-dependent behaviour.
    return nn.Dense(self.num_classes)(x_BxD.reshape(x_BxD.shape[0], -1))


def flatten(images: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H*W*C]."""
  return jnp.reshape(images, (images.shape[0], -1))

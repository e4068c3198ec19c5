"""Synthetic-gradient and synthetic-input models (Sec. 2.1, A.1).

The stale-gradient baseline of Sec. 3.1 is a gradient source in
`dni_jax.sources` (`sources.stale`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _bn_relu(x: jax.Array, train: bool, axis_name: str | None) -> jax.Array:
  """BatchNorm (batch statistics in training, over `axis_name` when mapped)
  -> ReLU, as a submodule of the module whose compact call runs it."""
  x = nn.BatchNorm(use_running_average=not train, axis_name=axis_name)(x)
  return nn.relu(x)


class SyntheticGradientMLP(nn.Module):
  """M(h, c): `hidden_layers` x (linear -> BatchNorm -> ReLU), then a linear layer.

  The final layer is initialised to zero weights and biases (A.1), so a new
  model emits exactly zero synthetic gradients. With `hidden_layers=0` the model
  is linear, delta_hat = phi_w [h, c] + phi_b. A context (cDNI: the one-hot
  label) is concatenated to the input.
  """
  hidden_layers: int
  hidden_size: int
  out_features: int
  axis_name: str | None = None  # BatchNorm statistics over this mapped axis.

  @nn.compact
  def __call__(self, h_BxD: jax.Array, context_BxC: jax.Array | None,
               train: bool) -> jax.Array:
    x = h_BxD.reshape(h_BxD.shape[0], -1)
    if context_BxC is not None:
      x = jnp.concatenate([x, context_BxC.astype(x.dtype)], axis=-1)
    for _ in range(self.hidden_layers):
      x = nn.Dense(self.hidden_size, use_bias=False)(x)  # BN has the offset.
      x = _bn_relu(x, train, self.axis_name)
    out = nn.Dense(self.out_features, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros)(x)
    return out.reshape(h_BxD.shape)


class SyntheticGradientCNN(nn.Module):
  """Convolutional M(h, c) for CNN activations (Sec. 3.1, A.1).

  A CNN without pooling: `hidden_layers` x (5x5 resolution-preserving
  convolution -> BatchNorm -> ReLU), then a 5x5 convolution to the channels of
  h, zero-initialised. cDNI: the label enters as ten channel masks, the one of
  the label all ones and the other nine all zeros (A.1).
  """
  hidden_layers: int
  features: int
  out_features: int
  axis_name: str | None = None  # BatchNorm statistics over this mapped axis.

  @nn.compact
  def __call__(self, h_BxHxWxC: jax.Array, context_BxK: jax.Array | None,
               train: bool) -> jax.Array:
    x = h_BxHxWxC
    if context_BxK is not None:
      masks = jnp.broadcast_to(
          context_BxK[:, None, None, :].astype(x.dtype),
          x.shape[:-1] + (context_BxK.shape[-1],))
      x = jnp.concatenate([x, masks], axis=-1)
    for _ in range(self.hidden_layers):
      x = nn.Conv(self.features, (5, 5), padding='SAME', use_bias=False)(x)
      x = _bn_relu(x, train, self.axis_name)
    return nn.Conv(self.out_features, (5, 5), padding='SAME',
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros)(x)


class SyntheticInputMLP(nn.Module):
  """I(x): predicts a layer's input from the data (complete unlock, A.1):
  one hidden layer (linear -> BatchNorm -> ReLU), then a linear layer."""
  hidden_size: int
  out_features: int
  axis_name: str | None = None  # BatchNorm statistics over this mapped axis.

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    x = images.reshape(images.shape[0], -1)
    x = nn.Dense(self.hidden_size, use_bias=False)(x)
    x = _bn_relu(x, train, self.axis_name)
    return nn.Dense(self.out_features)(x)

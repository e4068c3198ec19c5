"""Synthetic-gradient models (Sec. 2.1, A.1) and the stale-gradient baseline (Sec. 3.1)."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


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
      x = nn.BatchNorm(use_running_average=not train,
                       axis_name=self.axis_name)(x)
      x = nn.relu(x)
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
      x = nn.BatchNorm(use_running_average=not train,
                       axis_name=self.axis_name)(x)
      x = nn.relu(x)
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
    x = nn.BatchNorm(use_running_average=not train,
                       axis_name=self.axis_name)(x)
    x = nn.relu(x)
    return nn.Dense(self.out_features)(x)


class StaleGradientState(NamedTuple):
  """The stale baseline's memory for one interface."""
  average: jax.Array   # [B, ...h]: an exponential moving average of the
                       # per-example targets seen in each batch slot.


class StaleGradient(NamedTuple):
  """Historical-gradient baseline of Sec. 3.1, in place of M(h, c).

  Not a model of the gradient but a memory of it: the gradient given for the
  b-th example of a batch is an exponential moving average of the targets
  received for the b-th examples of *earlier* batches, so it never belongs
  to the example it is used for (as in the paper). It is trained on the same
  (bootstrapped, or true at the top) targets a synthetic-gradient model gets:
  `average <- decay * average + (1 - decay) * target`. With decay 0 a layer
  is updated with the gradient of the example in its slot one step earlier.
  """
  decay: float
  batch_size: int

  def init(self, h_shape: tuple[int, ...]) -> StaleGradientState:
    return StaleGradientState(jnp.zeros((self.batch_size,) + tuple(h_shape),
                                        jnp.float32))

  def gradient(self, state: StaleGradientState, h: jax.Array) -> jax.Array:
    # A smaller batch (the diagnostics' probe) reads the first slots.
    if h.shape[1:] != state.average.shape[1:] or h.shape[0] > self.batch_size:
      raise ValueError(f'the stale baseline holds gradients for batches of '
                       f'shape {state.average.shape}, got activations of shape '
                       f'{h.shape}: train with the batch size it was built for')
    return state.average[:h.shape[0]].astype(h.dtype)

  def update(self, state: StaleGradientState,
             target: jax.Array) -> StaleGradientState:
    return StaleGradientState(self.decay * state.average
                              + (1 - self.decay) * target)

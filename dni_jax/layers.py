"""Feed-forward building blocks (Sec. 3.1, A.1): Flax modules, no state on self."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# `dtype` of the modules below: the compute dtype of their matmul /
# convolution and BatchNorm ('float32', or 'bfloat16' on accelerators).
# Parameters stay float32 and every module returns float32, so the
# interfaces between modules (activations, synthetic gradients) keep one
# dtype whatever the compute dtype.


class HiddenDense(nn.Module):
  """One FCN "layer" of the paper: linear -> batch-normalisation -> ReLU."""
  features: int
  axis_name: str | None = None  # BatchNorm statistics over this mapped axis.
  dtype: str = 'float32'        # Compute dtype (see above).

  @nn.compact
  def __call__(self, x_BxD: jax.Array, train: bool) -> jax.Array:
    x_BxD = x_BxD.reshape(x_BxD.shape[0], -1)
    # No bias: BatchNorm's offset replaces it (a bias before BN gets a zero
    # gradient, and Adam would turn its rounding noise into full-size steps).
    h = nn.Dense(self.features, use_bias=False, dtype=self.dtype)(x_BxD)
    h = nn.BatchNorm(use_running_average=not train,
                     axis_name=self.axis_name, dtype=self.dtype)(h)
    return nn.relu(h).astype(jnp.float32)


class Classifier(nn.Module):
  """The final (N-th) layer: a linear classifier producing logits."""
  num_classes: int
  dtype: str = 'float32'        # Compute dtype (see above).

  @nn.compact
  def __call__(self, x_BxD: jax.Array, train: bool) -> jax.Array:
    del train  # No batch-dependent behaviour.
    return nn.Dense(self.num_classes, dtype=self.dtype)(
        x_BxD.reshape(x_BxD.shape[0], -1)).astype(jnp.float32)


class HiddenConv(nn.Module):
  """One CNN "layer" of A.1: 5x5 convolution (resolution preserving) ->
  BatchNorm -> ReLU -> 3x3 pooling, max in the first layer and average in the
  others. The pooling stride is 2 (the paper does not give it), so MNIST goes
  28 -> 14 -> 7 -> 4 and CIFAR-10 32 -> 16 -> 8 -> 4."""
  features: int
  pool: str  # 'max' or 'avg'.
  axis_name: str | None = None  # BatchNorm statistics over this mapped axis.
  dtype: str = 'float32'        # Compute dtype (see above).

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    h = nn.Conv(self.features, (5, 5), padding='SAME', use_bias=False,
                dtype=self.dtype)(x_BxHxWxC)
    h = nn.BatchNorm(use_running_average=not train,
                     axis_name=self.axis_name, dtype=self.dtype)(h)
    h = nn.relu(h)
    pool = nn.max_pool if self.pool == 'max' else nn.avg_pool
    return pool(h, (3, 3), strides=(2, 2), padding='SAME').astype(jnp.float32)

"""Pure-function layers shared by the recurrent and multi-network code.

Parameters are plain dicts of arrays (no Flax): a fan-in uniform initialiser,
a bias broadcast without implicit rank promotion, a linear layer, and the
synthetic-gradient MLP M of A.3 and A.4 (one hidden ReLU layer, final layer
zero-initialised as in A.1, so a new model emits exactly zero).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]


def uniform(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), float32."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def feature(v_D: Array, like: Array) -> Array:
  """v[D] shaped to broadcast over like[..., D] (no implicit rank promotion)."""
  return v_D.reshape((1,) * (like.ndim - 1) + v_D.shape)


def add_bias(x: Array, b: Array) -> Array:
  """x[..., D] + b[D], broadcast explicitly."""
  return x + feature(b, x)


def init_linear(key: Array, fan_in: int, fan_out: int) -> Params:
  """{'w': uniform in fan_in, 'b': zeros}."""
  return {'w': uniform(key, (fan_in, fan_out), fan_in),
          'b': jnp.zeros((fan_out,), jnp.float32)}


def linear(params: Params, x: Array) -> Array:
  """x[..., fan_in] @ w + b."""
  return add_bias(x @ params['w'], params['b'])


def init_mlp(key: Array, in_size: int, hidden_size: int, out_size: int
             ) -> Params:
  """M's parameters {'w1', 'b1', 'w2', 'b2'}: the hidden layer uniform in
  `in_size`, the final layer zero (A.1)."""
  return {'w1': uniform(key, (in_size, hidden_size), in_size),
          'b1': jnp.zeros((hidden_size,), jnp.float32),
          'w2': jnp.zeros((hidden_size, out_size), jnp.float32),
          'b2': jnp.zeros((out_size,), jnp.float32)}


def mlp_apply(params: Params, x: Array) -> Array:
  """M(x) on [..., in_size] -> [..., out_size]: linear -> ReLU -> linear."""
  hidden = jax.nn.relu(linear({'w': params['w1'], 'b': params['b1']}, x))
  return linear({'w': params['w2'], 'b': params['b2']}, hidden)

"""Networks A and B of the two-network system (Sec. 3.3, A.4): their
parameters and states, forward passes, losses and the forward-only
evaluation of one block."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dni_jax import functional
from dni_jax import losses
from dni_jax import sources
from dni_jax.multinet.config import Array
from dni_jax.multinet.config import Block
from dni_jax.multinet.config import LstmState
from dni_jax.multinet.config import MultinetConfig
from dni_jax.multinet.config import NetState
from dni_jax.multinet.config import Params
from dni_jax.multinet.layers import bn_linear
from dni_jax.multinet.layers import bn_lstm_unroll
from dni_jax.multinet.layers import init_bn_linear
from dni_jax.multinet.layers import init_bn_lstm
from dni_jax.multinet.layers import init_bn_stats
from dni_jax.multinet.layers import init_sg_model


def zero_carry(config: MultinetConfig, batch_size: int) -> LstmState:
  shape = (batch_size, config.hidden_size)
  # Two buffers, not one twice: the states are donated to the updates.
  return (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def init_a(config: MultinetConfig, key: Array) -> tuple[Params, Params]:
  k1, k2, kc, kr, km = jax.random.split(key, 5)
  core, core_stats = init_bn_lstm(config, kc, config.fcn_size)
  params = {
      'fcn1': init_bn_linear(k1, config.image_size, config.fcn_size),
      'fcn2': init_bn_linear(k2, config.fcn_size, config.fcn_size),
      'core': core,
      'readout': functional.init_linear(kr, config.hidden_size,
                                        config.a_classes),
      'message': init_bn_linear(km, config.hidden_size, config.message_size),
  }
  stats = {'fcn1': init_bn_stats(config.fcn_size),
           'fcn2': init_bn_stats(config.fcn_size), 'core': core_stats,
           'message': init_bn_stats(config.message_size)}
  return params, stats


def init_b(config: MultinetConfig, key: Array) -> tuple[Params, Params]:
  kc, kr, ks = jax.random.split(key, 3)
  core, core_stats = init_bn_lstm(config, kc, config.message_size)
  params = {'core': core,
            'readout': functional.init_linear(kr, config.hidden_size,
                                              config.b_classes)}
  if config.mode == 'dni':
    params['sg'] = init_sg_model(config, ks)
  return params, {'core': core_stats}


class AOutputs(NamedTuple):
  logits: Array       # f32[B, K, T + 1]: A's classifier at each tick.
  messages: Array     # f32[B, K, message_size].
  carry: LstmState    # A's state after the L steps.
  moments: Params     # Batch statistics per BN site (training only).


def a_forward(config: MultinetConfig, params: Params, running: Params,
              carry: LstmState, images_BxLxD: Array, training: bool
              ) -> AOutputs:
  """A over L = K T steps: FCN, BN-LSTM; classifier and message at the last
  step of each window of T."""
  batch, length = images_BxLxD.shape[:2]
  x, m1 = bn_linear(config, params['fcn1'], running['fcn1'], images_BxLxD,
                     training)
  x, m2 = bn_linear(config, params['fcn2'], running['fcn2'], jax.nn.relu(x),
                     training)
  carry, h_BxLxH, m_core = bn_lstm_unroll(
      config, params['core'], running['core'], carry, jax.nn.relu(x), training)
  ticks = length // config.tick
  h_BxKxH = h_BxLxH.reshape(batch, ticks, config.tick, -1)[:, :, -1]
  messages, m_msg = bn_linear(config, params['message'], running['message'],
                               h_BxKxH, training)
  return AOutputs(functional.linear(params['readout'], h_BxKxH), messages,
                  carry,
                  {'fcn1': m1, 'fcn2': m2, 'core': m_core, 'message': m_msg})


def b_forward(config: MultinetConfig, params: Params, running: Params,
              carry: LstmState, messages_BxKxM: Array, training: bool
              ) -> tuple[Array, LstmState, Params]:
  """B over K ticks: (logits f32[B, K, T^2 + 1], carry, batch moments)."""
  carry, h_BxKxH, moments = bn_lstm_unroll(
      config, params['core'], running['core'], carry, messages_BxKxM, training)
  logits = functional.linear(params['readout'], h_BxKxH)
  return logits, carry, {'core': moments}


def classification_loss(logits: Array, targets: Array) -> tuple[Array, Array]:
  """(Batch mean of the cross-entropy summed over the K outputs, number of
  wrong arg-max answers)."""
  nll = losses.softmax_cross_entropy(logits, targets)
  wrong = jnp.sum(jnp.argmax(logits, axis=-1) != targets)
  return jnp.sum(nll) / logits.shape[0], wrong


def make_optimizer(config: MultinetConfig) -> optax.GradientTransformation:
  """Every module's optimiser (A.4: Adam; each module has its own state)."""
  return optax.adam(config.learning_rate)


def evaluate_block(config: MultinetConfig, state_a: NetState,
                   state_b: NetState, carry_a: LstmState, carry_b: LstmState,
                   block: Block) -> tuple[LstmState, LstmState, dict]:
  """Forward only, running BN averages: (carries, sums of wrong answers and
  counts of both networks over the block)."""
  out = a_forward(config, state_a.params, state_a.bn_stats, carry_a,
                  block.images, False)
  logits_b, carry_b, _ = b_forward(config, state_b.params, state_b.bn_stats,
                                   carry_b, out.messages, False)
  _, wrong_a = classification_loss(out.logits, block.a_targets)
  _, wrong_b = classification_loss(logits_b, block.b_targets)
  return out.carry, carry_b, {'a_wrong': wrong_a, 'b_wrong': wrong_b,
                              'a_count': block.a_targets.size,
                              'b_count': block.b_targets.size}


def init_states(config: MultinetConfig, key: Array, batch_size: int
                ) -> tuple[NetState, NetState]:
  """A's and B's states; the same key gives A and B's core/readout the same
  initial values in every mode."""
  key_a, key_b = jax.random.split(key)
  states = []
  for params, stats in (init_a(config, key_a), init_b(config, key_b)):
    states.append(NetState(params=params,
                           opt_state=sources.init_modules(
                               make_optimizer(config), params),
                           bn_stats=stats,
                           carry=zero_carry(config, batch_size),
                           updates=jnp.zeros((), jnp.int32)))
  return states[0], states[1]

"""Two RNNs ticking at different rates, bridged by a DNI (Sec. 3.3, Fig. 8,
A.4).

Network A (FCN + recurrent-BN LSTM) reads one digit per step and every T steps
counts odd digits and sends a message to Network B, which ticks once every T
steps and counts 3s among the last T^2 digits. Modes: `backprop` (one joint
graph per T^2 steps), `dni` (A consumes sg_scale * M(m); B trains M to the
true message gradients it returns) and `decoupled` (A's message gets zero
gradient).

  config    MultinetConfig (validated), NetState, Block, the stream's targets
  layers    BatchNorm per time step, the recurrent-BN LSTM, Linear -> BN, M
  networks  A's and B's parameters, forward passes, losses, evaluation
  updates   A's, B's and the joint update, one block's schedule, the factory

Design notes (modes, gradient convention, choices where the paper is
silent): docs/architecture/recurrent_multinet.md and docs/MULTINET.md.
"""

from dni_jax.multinet.config import Array
from dni_jax.multinet.config import Block
from dni_jax.multinet.config import LstmState
from dni_jax.multinet.config import MODES
from dni_jax.multinet.config import MultinetConfig
from dni_jax.multinet.config import NetState
from dni_jax.multinet.config import Params
from dni_jax.multinet.config import stream_targets
from dni_jax.multinet.config import validate_config
from dni_jax.multinet.layers import batch_norm
from dni_jax.multinet.layers import bn_linear
from dni_jax.multinet.layers import bn_lstm_unroll
from dni_jax.multinet.layers import init_bn_linear
from dni_jax.multinet.layers import init_bn_lstm
from dni_jax.multinet.layers import init_bn_stats
from dni_jax.multinet.layers import init_sg_model
from dni_jax.multinet.layers import sg_model_apply
from dni_jax.multinet.layers import update_running
from dni_jax.multinet.layers import update_stats
from dni_jax.multinet.networks import a_forward
from dni_jax.multinet.networks import AOutputs
from dni_jax.multinet.networks import b_forward
from dni_jax.multinet.networks import classification_loss
from dni_jax.multinet.networks import evaluate_block
from dni_jax.multinet.networks import init_a
from dni_jax.multinet.networks import init_b
from dni_jax.multinet.networks import init_states
from dni_jax.multinet.networks import make_optimizer
from dni_jax.multinet.networks import zero_carry
from dni_jax.multinet.updates import a_gradients
from dni_jax.multinet.updates import a_step
from dni_jax.multinet.updates import a_update
from dni_jax.multinet.updates import AGradients
from dni_jax.multinet.updates import b_gradients
from dni_jax.multinet.updates import b_step
from dni_jax.multinet.updates import joint_loss
from dni_jax.multinet.updates import joint_step
from dni_jax.multinet.updates import make_multinet
from dni_jax.multinet.updates import Multinet
from dni_jax.multinet.updates import sg_regression
from dni_jax.multinet.updates import train_block

"""dni_jax: Decoupled Neural Interfaces using Synthetic Gradients, in JAX."""

from dni_jax.feedforward import DECOUPLED_METHODS
from dni_jax.feedforward import FeedForward
from dni_jax.feedforward import FeedForwardConfig
from dni_jax.feedforward import FeedForwardState
from dni_jax.feedforward import make_feedforward
from dni_jax.feedforward import METHODS
from dni_jax.feedforward import ModuleState
from dni_jax.feedforward import per_layer_train_step
from dni_jax.interface import pull_back
from dni_jax.interface import synthetic_gradient_loss

__version__ = '0.1.0'

"""dni_jax: Decoupled Neural Interfaces using Synthetic Gradients, in JAX."""

from dni_jax.device_pipeline import DevicePipeline
from dni_jax.device_pipeline import DevicePipelineState
from dni_jax.device_pipeline import make_device_pipeline
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
from dni_jax.multinet import make_multinet
from dni_jax.multinet import Multinet
from dni_jax.multinet import MultinetConfig
from dni_jax.multinet import NetState
from dni_jax.parallel import initialize_distributed
from dni_jax.parallel import make_data_mesh
from dni_jax.parallel import make_data_parallel
from dni_jax.parallel import make_data_parallel_recurrent
from dni_jax.parallel import make_per_device_step
from dni_jax.parallel import make_shard_map_step
from dni_jax.parallel import shard_batch
from dni_jax.pipeline import make_backprop_pipeline
from dni_jax.pipeline import make_pipeline
from dni_jax.pipeline import Pipeline
from dni_jax.pipeline import PipelineState
from dni_jax.pipeline import stage_mesh
from dni_jax.recurrent import make_recurrent
from dni_jax.recurrent import Recurrent
from dni_jax.recurrent import RecurrentConfig
from dni_jax.recurrent import RecurrentState

__version__ = '0.1.0'

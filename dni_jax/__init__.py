"""dni_jax: Decoupled Neural Interfaces using Synthetic Gradients, in JAX.

The public API is `__all__` (re-exports of the modules below): feed-forward
networks (`FeedForwardConfig`, `make_feedforward`), recurrent networks
(`RecurrentConfig`, `make_recurrent`), the two-network experiment
(`MultinetConfig`, `make_multinet`), data parallelism and pipelines, and the
datasets (`dni_jax.data.load_dataset`, also `load_dataset` here).
"""

from dni_jax import data
from dni_jax import sources
from dni_jax.data import DataError
from dni_jax.data import Dataset
from dni_jax.data import load_dataset
from dni_jax.decoupling import decouple
from dni_jax.decoupling import Decoupled
from dni_jax.decoupling import DecoupledState
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
from dni_jax.sources import GradientSource

__version__ = '0.1.0'

__all__ = [
    'DataError',
    'Dataset',
    'DECOUPLED_METHODS',
    'decouple',
    'Decoupled',
    'DecoupledState',
    'DevicePipeline',
    'DevicePipelineState',
    'FeedForward',
    'FeedForwardConfig',
    'FeedForwardState',
    'GradientSource',
    'initialize_distributed',
    'load_dataset',
    'make_backprop_pipeline',
    'make_data_mesh',
    'make_data_parallel',
    'make_data_parallel_recurrent',
    'make_device_pipeline',
    'make_feedforward',
    'make_multinet',
    'make_per_device_step',
    'make_pipeline',
    'make_recurrent',
    'make_shard_map_step',
    'METHODS',
    'ModuleState',
    'Multinet',
    'MultinetConfig',
    'NetState',
    'per_layer_train_step',
    'Pipeline',
    'PipelineState',
    'pull_back',
    'Recurrent',
    'RecurrentConfig',
    'RecurrentState',
    'shard_batch',
    'stage_mesh',
    'synthetic_gradient_loss',
]

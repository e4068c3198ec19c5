"""Pipelines: a network's blocks on the devices of a `stage` mesh.

  staging    the mesh, stage placement, messages, stack/unstack, metrics
  decoupled  the decoupled DNI pipeline as one SPMD program (`make_pipeline`)
  per_stage  the same pipeline as one program per stage (MPMD,
             `make_device_pipeline`)
  gpipe      the backprop baseline, GPipe (`make_backprop_pipeline`)
  balancing  stage boundaries that minimise the slowest stage

Design notes and measurements: docs/architecture/pipeline.md.
"""

from dni_jax.pipeline.balancing import balanced_interfaces
from dni_jax.pipeline.balancing import fcn_costs
from dni_jax.pipeline.decoupled import check_dni_config
from dni_jax.pipeline.decoupled import make_pipeline
from dni_jax.pipeline.decoupled import Pipeline
from dni_jax.pipeline.decoupled import pipeline_tick_local
from dni_jax.pipeline.decoupled import pipeline_ticks_local
from dni_jax.pipeline.decoupled import PipelineState
from dni_jax.pipeline.decoupled import skip_metrics
from dni_jax.pipeline.decoupled import stage_block_phase
from dni_jax.pipeline.decoupled import stage_synthetic_phase
from dni_jax.pipeline.gpipe import backprop_stages
from dni_jax.pipeline.gpipe import BackpropPipeline
from dni_jax.pipeline.gpipe import BackpropPipelineState
from dni_jax.pipeline.gpipe import make_backprop_pipeline
from dni_jax.pipeline.per_stage import DevicePipeline
from dni_jax.pipeline.per_stage import DevicePipelineState
from dni_jax.pipeline.per_stage import make_device_pipeline
from dni_jax.pipeline.per_stage import StageState
from dni_jax.pipeline.staging import global_array
from dni_jax.pipeline.staging import interface_metrics
from dni_jax.pipeline.staging import merge_stages
from dni_jax.pipeline.staging import pipeline_layout
from dni_jax.pipeline.staging import PipelineLayout
from dni_jax.pipeline.staging import place_stage
from dni_jax.pipeline.staging import stack_stages
from dni_jax.pipeline.staging import STAGE_AXIS
from dni_jax.pipeline.staging import stage_layout
from dni_jax.pipeline.staging import stage_mesh
from dni_jax.pipeline.staging import stage_slice
from dni_jax.pipeline.staging import stage_trees
from dni_jax.pipeline.staging import unstack_stages

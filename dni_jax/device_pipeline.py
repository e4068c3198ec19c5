"""The per-stage (MPMD) decoupled pipeline: now `dni_jax.pipeline.per_stage`."""
from dni_jax.pipeline.per_stage import (  # noqa: F401
    DevicePipeline, DevicePipelineState, make_device_pipeline, StageState)

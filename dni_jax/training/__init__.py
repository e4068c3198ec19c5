"""The run harness every script shares (`open_workdir`, then `train`): the
workdir contract, restore, the loop, metrics, result, health checks.

  workdir.py     the workdir contract (`check_workdir`, `prepare_workdir`,
                 `open_workdir`), config.json, metrics.jsonl, result.json;
  checks.py      flag checks every script shares;
  checkpoint.py  orbax checkpoints (`Checkpointer`), orbax's logging quieted;
  health.py      finiteness of every step's metrics (`HealthTracker`);
  loop.py        the host loop (`run_loop`, `Schedule`), stop signals, progress;
  harness.py     `train` (restore, loop, result), `fit`, `EpochSampler`,
                 `evaluate`.

Every name is importable from here, as from the one module this was.
"""
# pylint: disable=unused-import
from dni_jax.training.checkpoint import (
    Checkpointer, _closed_loop_error, _ignore_closed_event_loop_errors,
    _write_failure, quiet_orbax_logging)
from dni_jax.training.checks import (
    check_at_most, check_non_negative, check_positive_finite,
    check_positive_flags, refuse)
from dni_jax.training.harness import (
    Array, EpochSampler, Hooks, LoopConfig, _gather, evaluate, fit, train)
from dni_jax.training.health import (
    _CAUSAL_ORDER, HealthTracker, _health_flags, _track_health, check_health,
    non_finite_error)
from dni_jax.training.loop import (
    LoopStats, Schedule, StopRequested, StopSignals, _format_seconds, run_loop)
from dni_jax.training.workdir import (
    CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, PATH_SETTINGS, RESULT_FILE,
    RESUMABLE, RUN_ENTRIES, TENSORBOARD_DIR, UNREADABLE_DIR, MetricsLog,
    TrainingError, WorkdirError, _check_creatable, _comparable,
    _foreign_entries, check_workdir, describe_os_error, finished_result,
    normalise_path, open_workdir, prepare_workdir, read_metrics,
    write_json_atomic)

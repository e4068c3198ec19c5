"""Experiment files: the paper's feed-forward settings as ml_collections
configs, for `scripts/train_ff.py --config=dni_jax/configs/FILE.py:ARG` and
for `scripts/reproduce.py`'s grids (one source for both).

Each file holds `RUNS` ({ARG: the settings that differ from train_ff.py's
defaults}), `GRIDS` ({reproduce.py experiment: {workdir name: ARG}}) and
`get_config(ARG)`, the base config (`ff_experiment.base_config`) with the
run's settings.
"""

import importlib
from typing import Any

from ml_collections import config_dict

from dni_jax import ff_experiment
from dni_jax import settings

FILES = ('table1', 'stale_baseline', 'fig9a', 'fig5')


def make(**values: Any) -> config_dict.ConfigDict:
  """The base config with `values` ({setting: value}) in their sections."""
  config = ff_experiment.base_config()
  settings.update(config, ff_experiment.FeedForwardExperiment, **values)
  return config


def pick(runs: dict[str, dict[str, Any]], arg: str | None, file: str,
         names: str | None = None) -> config_dict.ConfigDict:
  """The config of run `arg` of an experiment file; for another `arg`, a
  ValueError listing the file's runs (or `names`, a pattern of them)."""
  if arg not in runs:
    raise ValueError(f'{file}: no run {arg!r}; give --config={file}:RUN, '
                     f'RUN one of {names or ", ".join(runs)}')
  return make(**runs[arg])


def grids() -> dict[str, dict[str, config_dict.ConfigDict]]:
  """{reproduce.py experiment: {workdir name: config}} of every file."""
  out = {}
  for name in FILES:
    module = importlib.import_module(f'dni_jax.configs.{name}')
    for grid, runs in module.GRIDS.items():
      out[grid] = {workdir: module.get_config(arg)
                   for workdir, arg in runs.items()}
  return out

"""Sec. 3.1's stale-gradient baseline: FCNs of 3-6 layers whose layers learn
from a moving average of past gradients, at several decays.

  --config=dni_jax/configs/stale_baseline.py:fcn4_stale_decay0.9
"""

from dni_jax import configs

RUNS = {f'fcn{n}_stale_decay{d:g}': dict(num_layers=n, method='stale',
                                         stale_decay=d)
        for n in (3, 4, 5, 6) for d in (0.0, 0.9, 0.99, 0.999)}
GRIDS = {'stale_baseline': {name: name for name in RUNS}}


def get_config(arg: str | None = None):
  return configs.pick(RUNS, arg, 'stale_baseline.py')

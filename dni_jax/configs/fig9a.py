"""Fig. 9a: a 6-layer MNIST FCN with a single DNI (or a single cut with no
gradient, No-Bprop) after layer k, and Bprop for reference.

  --config=dni_jax/configs/fig9a.py:fcn6_dni_at3
"""

from dni_jax import configs

RUNS = {'fcn6_bprop': dict(num_layers=6, method='bprop')}
RUNS.update({f'fcn6_{m}_at{k}': dict(num_layers=6, method=m, dni_layers=(k,))
             for m in ('dni', 'no_bprop') for k in range(1, 6)})
GRIDS = {'fig9a_single_dni': {name: name for name in RUNS}}


def get_config(arg: str | None = None):
  return configs.pick(RUNS, arg, 'fig9a.py')

"""Fig. 5: a 4-layer MNIST FCN with sparse updates (left: every block
updates with probability p) and complete unlock (right: synthetic inputs).

  --config=dni_jax/configs/fig5.py:fcn4_cdni_p0.5
  --config=dni_jax/configs/fig5.py:fcn4_cdni_unlock_p0.5
"""

from dni_jax import configs

SPARSE = {f'fcn4_{m}_p{p}': dict(num_layers=4, method=m, p_update=p)
          for m in ('dni', 'cdni') for p in (1.0, 0.5, 0.2)}
UNLOCK = {f'fcn4_{m}_unlock_p{p}': dict(num_layers=4, method=m,
                                        synthetic_inputs=True, p_update=p)
          for m, p in (('dni', 1.0), ('cdni', 1.0), ('cdni', 0.5))}
RUNS = {**SPARSE, **UNLOCK}
GRIDS = {'fig5_sparse': {name: name for name in SPARSE},
         'fig5_unlock': {name: name for name in UNLOCK}}


def get_config(arg: str | None = None):
  return configs.pick(RUNS, arg, 'fig5.py')

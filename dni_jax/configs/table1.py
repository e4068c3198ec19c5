"""Table 1 (Sec. 3.1, A.1): MNIST and CIFAR-10, FCNs of 3-6 layers and CNNs
of 3-4 layers, trained with No-Bprop, Bprop, DNI and cDNI.

  --config=dni_jax/configs/table1.py:mnist_fcn4_cdni
  (ARG: {mnist,cifar10}_{fcn3..fcn6,cnn3,cnn4}_{no_bprop,bprop,dni,cdni})
"""

from dni_jax import configs

METHODS = ('no_bprop', 'bprop', 'dni', 'cdni')
DEPTHS = {'fcn': (3, 4, 5, 6), 'cnn': (3, 4)}


def _settings(dataset: str, model: str, layers: int, method: str) -> dict:
  """A.1's sizes: MNIST 256 units / 64 filters (the defaults); CIFAR-10
  FCNs 1000 units with 1-hidden-layer, 4000-unit synthetic-gradient models,
  CIFAR-10 CNNs 128 filters."""
  run = dict(num_layers=layers, method=method)
  if model == 'cnn':
    run['model'] = 'cnn'
  if dataset == 'cifar10':
    run['dataset'] = 'cifar10'
    if model == 'fcn':
      run['hidden_size'] = 1000
      if method in ('dni', 'cdni'):
        run.update(sg_hidden_layers=1, sg_hidden_size=4000)
    else:
      run['hidden_size'] = 128
  return run


RUNS = {f'{d}_{model}{n}_{m}': _settings(d, model, n, m)
        for d in ('mnist', 'cifar10') for model, depths in DEPTHS.items()
        for n in depths for m in METHODS}
GRIDS = {f'table1_{d}_{model}': {f'{model}{n}_{m}': f'{d}_{model}{n}_{m}'
                                 for n in depths for m in METHODS}
         for d in ('mnist', 'cifar10') for model, depths in DEPTHS.items()}


def get_config(arg: str | None = None):
  return configs.pick(RUNS, arg, 'table1.py', names=(
      '{mnist,cifar10}_{fcn3..fcn6,cnn3,cnn4}_{' + ','.join(METHODS) + '}'))

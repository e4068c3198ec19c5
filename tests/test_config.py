"""Settings declared once: train_ff.py's --config experiment files, their
overrides (defaults < file < --config.SECTION.NAME < flags of the settings'
names), bad overrides in one line, and reproduce.py's grids read from the
experiment files (compared with the grids as they were written before)."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from unittest import mock

import pytest

import conftest
from dni_jax import configs
from dni_jax import ff_experiment
from dni_jax import settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'dni_jax', 'configs')
Exp = ff_experiment.FeedForwardExperiment


def _load(script):
  spec = importlib.util.spec_from_file_location(
      f'{script[:-3]}_config_test', os.path.join(REPO, 'scripts', script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train_ff_experiment(*args):
  """The experiment train_ff.py builds from `args` (in-process; config_flags
  reads the --config.* overrides from sys.argv)."""
  argv = ['train_ff.py', '--workdir=w', *args]
  with conftest.absl_state_restored(), mock.patch.object(sys, 'argv', argv):
    module = _load('train_ff.py')
    module.FLAGS(argv)
    try:
      return module.cli.experiment_from_flags(Exp, module.FLAGS,
                                              config_flag='config')
    finally:
      module.FLAGS.unparse_flags()


def table1(arg):
  return f'--config={os.path.join(CONFIGS, "table1.py")}:{arg}'


# What the scripts run without --config: the library's defaults, on all
# devices (train_ff.py's --num_devices default).
DEFAULTS = dict(workdir='w', num_devices=None)


@pytest.mark.parametrize('args, same_as', [
    ([], {}),
    ([table1('mnist_fcn4_cdni')], dict(method='cdni')),
    ([table1('cifar10_fcn3_dni')],
     dict(dataset='cifar10', num_layers=3, hidden_size=1000,
          sg_hidden_layers=1, sg_hidden_size=4000)),
    # A --config.SECTION.NAME override beats the file.
    ([table1('cifar10_fcn3_dni'), '--config.model.num_layers=5'],
     dict(dataset='cifar10', num_layers=5, hidden_size=1000,
          sg_hidden_layers=1, sg_hidden_size=4000)),
    # A flag of the setting's name beats both.
    ([table1('mnist_cnn3_bprop'), '--config.loop.num_steps=7',
      '--num_layers=4', '--lr_boundaries=2,5'],
     dict(model='cnn', method='bprop', num_layers=4, num_steps=7,
          lr_boundaries=(2, 5))),
    # Overrides without --config start from the defaults; a setting whose
    # default is None is a typed placeholder, so it can be set.
    (['--config.model.hidden_size=32', '--config.synthetic.dni_layers=(2,)',
      '--config.optimizer.learning_rate=1e-3',
      '--config.runtime.num_devices=2'],
     dict(hidden_size=32, dni_layers=(2,), learning_rate=1e-3, num_devices=2)),
    (['--dni_layers=1', '--method=no_bprop', '--p_update=0.5'],
     dict(dni_layers=(1,), method='no_bprop', p_update=0.5)),
])
def test_override_precedence(args, same_as):
  assert train_ff_experiment(*args) == Exp(**{**DEFAULTS, **same_as})


def test_one_setting_given_both_ways_is_refused():
  with pytest.raises(ValueError, match=r'^--num_layers and '
                     r'--config\.model\.num_layers set the same setting'):
    train_ff_experiment('--num_layers=5', '--config.model.num_layers=6')


def test_the_base_config_holds_every_setting_at_the_scripts_default():
  config = ff_experiment.base_config()
  assert sorted(config) == ['data', 'loop', 'model', 'optimizer', 'pipeline',
                            'runtime', 'synthetic']
  flat = settings.flatten(config, Exp)
  assert Exp(workdir='w', **flat) == Exp(**DEFAULTS)
  # Every field but --workdir and --overwrite is in exactly one section.
  names = {f.name for f in dataclasses.fields(Exp)}
  assert set(flat) == names - {'workdir', 'overwrite'}
  assert config.synthetic.method == 'dni' and config.model.num_layers == 4
  with pytest.raises(AttributeError):   # Locked: a misspelt key is an error.
    config.model.num_layer = 3


def _experiment_files():
  names = sorted(f[:-3] for f in os.listdir(CONFIGS)
                 if f.endswith('.py') and f not in ('__init__.py',
                                                    'default.py'))
  assert names == sorted(configs.FILES)
  for name in names:
    spec = importlib.util.spec_from_file_location(
        f'config_{name}', os.path.join(CONFIGS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield name, module


def test_every_experiment_file_loads_and_validates():
  count = 0
  for name, module in _experiment_files():
    assert module.RUNS, name
    for arg in module.RUNS:
      exp = Exp(workdir='w', **settings.flatten(module.get_config(arg), Exp))
      for key, value in module.RUNS[arg].items():
        assert getattr(exp, key) == value, (name, arg, key)
      count += 1
    # Every run of its grids is one of its runs.
    for runs in module.GRIDS.values():
      assert set(runs.values()) <= set(module.RUNS), name
    with pytest.raises(ValueError, match=rf"{name}\.py: no run 'nope'; give "
                       rf'--config={name}\.py:RUN, RUN one of'):
      module.get_config('nope')
  assert count == 48 + 16 + 9 + 11


def _old_grid(name):
  """reproduce.py's grids as they were written before the experiment files
  (commit 1af8122): the reference."""
  methods = ('no_bprop', 'bprop', 'dni', 'cdni')
  if name == 'table1_mnist_fcn':
    return [dict(name=f'fcn{n}_{m}', num_layers=n, method=m)
            for n in (3, 4, 5, 6) for m in methods]
  if name == 'table1_mnist_cnn':
    return [dict(name=f'cnn{n}_{m}', model='cnn', num_layers=n, method=m)
            for n in (3, 4) for m in methods]
  if name == 'table1_cifar10_fcn':
    return [dict(name=f'fcn{n}_{m}', dataset='cifar10', num_layers=n,
                 method=m, hidden_size=1000,
                 **({'sg_hidden_layers': 1, 'sg_hidden_size': 4000}
                    if m in ('dni', 'cdni') else {}))
            for n in (3, 4, 5, 6) for m in methods]
  if name == 'table1_cifar10_cnn':
    return [dict(name=f'cnn{n}_{m}', dataset='cifar10', model='cnn',
                 num_layers=n, method=m, hidden_size=128)
            for n in (3, 4) for m in methods]
  if name == 'stale_baseline':
    return [dict(name=f'fcn{n}_stale_decay{d:g}', num_layers=n,
                 method='stale', stale_decay=d)
            for n in (3, 4, 5, 6) for d in (0.0, 0.9, 0.99, 0.999)]
  if name == 'fig5_sparse':
    return [dict(name=f'fcn4_{m}_p{p}', num_layers=4, method=m, p_update=p)
            for m in ('dni', 'cdni') for p in (1.0, 0.5, 0.2)]
  if name == 'fig5_unlock':
    return [dict(name=f'fcn4_{m}_unlock_p{p}', num_layers=4, method=m,
                 synthetic_inputs=True, p_update=p)
            for m, p in (('dni', 1.0), ('cdni', 1.0), ('cdni', 0.5))]
  assert name == 'fig9a_single_dni'
  runs = [dict(name='fcn6_bprop', num_layers=6, method='bprop')]
  for method in ('dni', 'no_bprop'):
    runs += [dict(name=f'fcn6_{method}_at{k}', num_layers=6, method=method,
                  dni_layers=(k,)) for k in range(1, 6)]
  return runs


def test_reproduce_grids_are_the_experiment_files_runs():
  with conftest.absl_state_restored():
    reproduce = _load('reproduce.py')
  assert set(reproduce.GRIDS) == {
      'table1_mnist_fcn', 'table1_mnist_cnn', 'table1_cifar10_fcn',
      'table1_cifar10_cnn', 'stale_baseline', 'fig9a_single_dni',
      'fig5_sparse', 'fig5_unlock'}
  for grid in reproduce.GRIDS:
    new, old = reproduce.grid(grid), _old_grid(grid)
    assert [r['name'] for r in new] == [r['name'] for r in old], grid
    for a, b in zip(new, old):
      a, b = dict(a), dict(b)
      assert a.pop('name') == b.pop('name')
      # The same experiment as before (reproduce.py sets the schedule and
      # the data folder of both alike).
      assert Exp(workdir='w', **a) == Exp(workdir='w', **b), grid


@pytest.mark.slow
@pytest.mark.parametrize('args, needle', [
    (['--config.model.num_layer=5'], '--config.model.num_layer: no such '
     'setting (did you mean --config.model.num_layers?)'),
    (['--config.model.num_layers=abc'], 'config.model.num_layers'),
    ([table1('mnist_fcn9_cdni')], "table1.py: no run 'mnist_fcn9_cdni'"),
    (['--config=/nonexistent/exp.py'], '/nonexistent/exp.py'),
    (['--config.model.num_layers=1'], '--num_layers=1 must be >= 2'),
    (['--num_layers=3', '--config.model.num_layers=4'],
     '--num_layers and --config.model.num_layers set the same setting'),
])
def test_a_bad_config_or_override_is_one_error_line(tmp_path, args, needle):
  import test_script_errors  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'train_ff.py'),
       f'--workdir={workdir}', f'--data_dir={tmp_path}', *args],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  test_script_errors.assert_one_line_error(proc, needle)
  assert proc.stderr.splitlines()[-1].startswith('train_ff.py: error: ')
  assert not workdir.exists()


def test_a_config_that_is_not_the_settings_is_refused():
  """A hand-written experiment file may misspell or drop a setting: the
  config must hold exactly the settings, each in its section."""
  config = ff_experiment.base_config()
  with config.unlocked():
    config.model.depth = 3
  with pytest.raises(ValueError, match=r'^no such setting: model\.depth$'):
    settings.flatten(config, Exp)
  config = ff_experiment.base_config()
  with config.unlocked():
    del config.loop['seed']
  with pytest.raises(ValueError, match=r'^missing: loop\.seed$'):
    settings.flatten(config, Exp)

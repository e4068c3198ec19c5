"""scripts/reproduce.py's fidelity experiments: every entry is the command
docs/FIDELITY.md documents and parses in its driver; a tiny entry runs end to
end, resumes and plots; bad input is one line and writes nothing."""

import collections
import functools
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import conftest

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
SCRIPTS = os.path.join(REPO, 'scripts')
SCRIPT = os.path.join(SCRIPTS, 'reproduce.py')
# The docs' output, data and path flags: reproduce.py sets them itself.
OUTPUT_FLAGS = ('workdir', 'data_dir', 'summary_json', 'plot', 'out')


@functools.lru_cache(maxsize=None)
def _module():
  """reproduce.py imported (its flags are defined only when it runs)."""
  return conftest.load_script('reproduce')


@pytest.fixture(autouse=True, scope='module')
def _restore_absl_state():
  with conftest.absl_state_restored():
    yield
    _module.cache_clear()


def _main(*args):
  """reproduce.py's main in this process, its flags defined once."""
  module = _module()
  if 'driver_flag' not in module.FLAGS:
    module.define_flags()
  conftest.run_main(module, *args)


def _documented_commands() -> list[tuple[list[str], list[str]]]:
  """(the documented command, the `# or: reproduce.py ...` line after it),
  as argument lists, for every such pair in docs/FIDELITY.md's command
  blocks; shell variables (P=..., S=...) expanded."""
  with open(os.path.join(REPO, 'docs', 'FIDELITY.md')) as f:
    lines = f.read().splitlines()
  variables, pairs, previous, pending = {}, [], None, ''
  for line in lines:
    if line.startswith('# or: '):
      pairs.append((previous, shlex.split(line[len('# or: '):])))
      continue
    pending += line
    if line.endswith('\\'):
      pending = pending[:-1]
      continue
    text, pending = pending, ''
    match = re.fullmatch(r'([A-Z])=(.*)', text)
    if match:
      variables[match.group(1)] = ' '.join(shlex.split(match.group(2)))
      continue
    text = re.sub(r'\$([A-Z])\b', lambda m: variables.get(m.group(1),
                                                          m.group(0)), text)
    if '.py ' in text and not text.startswith('#'):
      previous = shlex.split(text, comments=True)
  return pairs


def test_docs_write_every_entry_beside_its_command():
  """Each `# or:` line follows a command of the entry's driver with exactly
  the entry's flags (plus its --driver_flag ones), and has --data_dir iff the
  experiment reads data; every entry has such a line."""
  reproduce = _module()
  named = set()
  for documented, alternative in _documented_commands():
    assert documented is not None, alternative
    flags = dict(a[2:].split('=', 1) for a in alternative[2:])
    name = flags['experiment']
    named.add(name)
    extra = [a.split('=', 1)[1] for a in alternative[2:]
             if a.startswith('--driver_flag=')]
    driver, args = reproduce.driver_args(name, extra)
    scripts = [os.path.basename(a) for a in documented if a.endswith('.py')]
    assert scripts == [driver.script], (name, documented)
    flags_there = [a for a in documented if a.startswith('--') and
                   a[2:].split('=')[0] not in OUTPUT_FLAGS]
    assert collections.Counter(flags_there) == collections.Counter(args), name
    reads = driver.dataset(reproduce.flag_values(args))
    assert ('data_dir' in flags) == (reads is not None), name
  assert named == set(reproduce.FIDELITY)


def test_experiment_folder_and_outputs():
  reproduce = _module()
  cmd = reproduce.command('fid_stale', '/o', '/d')
  assert cmd[:2] == [sys.executable, os.path.join(
      os.path.dirname(os.path.abspath(reproduce.__file__)), 'fidelity_ff.py')]
  assert cmd[2:] == (reproduce.FIDELITY['fid_stale'][1].split() + [
      '--data_dir=/d', '--workdir=/o/fid_stale',
      '--summary_json=/o/fid_stale/summary.json',
      '--plot=/o/fid_stale/plot.png'])
  # No data for the recall; the multi-network reads MNIST; added flags
  # change the folder, so runs with other flags never share one.
  assert not any('data_dir' in a for a in reproduce.command(
      'fid_recall_lr1e-3', '/o', '/d'))
  assert '--data_dir=/d' in reproduce.command('fid_multinet', '/o', '/d')
  one = reproduce.command('fid_mcheck_lr3e-4', '/o', None, ['--seeds=0'])
  two = reproduce.command('fid_mcheck_lr3e-4', '/o', None, ['--seeds=1'])
  assert one[-2].startswith('--out=/o/fid_mcheck_lr3e-4+')
  assert one[-2] != two[-2] and one[-3:-2] == ['--seeds=0']


@pytest.mark.slow
@pytest.mark.parametrize('driver', ['fidelity_ff', 'fidelity_rnn',
                                    'recall_m_check'])
def test_every_entry_parses_in_its_driver(tmp_path, driver):
  """Every entry's full command (documented flags, outputs, data) is
  accepted by the driver's own absl flag definitions (an unknown flag or a
  bad value raises)."""
  names = [n for n, (d, _) in _module().FIDELITY.items() if d == driver]
  assert names
  code = f"""
import importlib, json, sys
sys.path.insert(0, {SCRIPTS!r})
from absl import flags
spec = importlib.util.spec_from_file_location('reproduce_script', {SCRIPT!r})
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)
driver = importlib.import_module({driver!r})
if hasattr(driver, 'define_flags'):
  driver.define_flags()
for name in {names!r}:
  cmd = reproduce.command(name, {str(tmp_path)!r}, '/data')
  flags.FLAGS.unparse_flags()
  rest = flags.FLAGS(cmd[1:])
  assert rest == cmd[1:2], rest
  for arg in cmd[2:]:
    key = arg[2:].split('=')[0]
    if key not in flags.FLAGS and key.startswith('no'):   # --nodistractors
      key = key[2:]
    assert flags.FLAGS[key].present, arg
  print(name)
"""
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == names
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_fidelity_entry_runs_resumes_and_plots(tmp_path):
  """fid_dni_1k at a tiny size (added driver flags) on synthetic MNIST:
  the command --print_command shows is the one run; the runs, summary and
  plot land in OUT/fid_dni_1k+<hash>/; a rerun trains nothing."""
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 96, 64)
  out = tmp_path / 'out'
  tiny = ['--seeds=0', '--num_steps=4', '--num_evals=2', '--hidden_size=8',
          '--sg_hidden_size=8', '--batch_size=16', '--probe_size=16']
  args = [sys.executable, SCRIPT, '--experiment=fid_dni_1k',
          f'--data_dir={data_dir}', f'--out={out}',
          *(f'--driver_flag={f}' for f in tiny)]
  run = lambda *extra: subprocess.run(args + list(extra), capture_output=True,
                                      text=True, cwd=REPO, timeout=600)
  shown = run('--print_command')
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert not out.exists()
  first = run()
  assert first.returncode == 0, first.stderr[-3000:]
  assert f'fid_dni_1k: {shown.stdout.strip()}' in first.stdout.splitlines()
  (folder,) = out.iterdir()
  assert folder.name.startswith('fid_dni_1k+')
  runs = sorted(p.name for p in folder.iterdir() if p.is_dir())
  assert runs == ['mnist_fcn4_bprop_lr0.0003_4_s0',
                  'mnist_fcn4_dni_lr0.0003_4_s0']
  with open(folder / 'summary.json') as f:
    summary = json.load(f)['summary']
  assert summary['mnist_fcn4_dni_lr0.0003_4']['seeds'] == 1
  assert (folder / 'plot.png').read_bytes()[:4] == b'\x89PNG'
  assert (folder / 'command.txt').read_text() == shlex.join(
      ['fidelity_ff.py'] + _module().FIDELITY['fid_dni_1k'][1].split()
      + tiny) + '\n'
  result = folder / runs[1] / 'result.json'
  mtime = result.stat().st_mtime
  second = run()
  assert second.returncode == 0, second.stderr[-3000:]
  assert ' step ' not in second.stdout   # Nothing trained.
  assert result.stat().st_mtime == mtime
  # Other flags into the same folder are refused.
  (folder / 'command.txt').write_text('fidelity_ff.py --seeds=5\n')
  third = run()
  assert third.returncode == 1
  assert third.stderr.strip().splitlines()[-1].startswith(
      f'reproduce.py: error: {folder} holds --experiment=fid_dni_1k run with '
      'other flags')


@pytest.mark.slow
def test_m_check_entry_is_skipped_once_finished_and_plots(tmp_path):
  """recall_m_check.py does not resume: the entry runs it once, writes its
  result and plot, and a rerun does nothing."""
  out = tmp_path / 'out'
  tiny = ['--num_steps=6', '--m_steps=4', '--m_eval_every=2', '--lag_every=2',
          '--hidden_size=6', '--batch_size=4', '--eval_batch=8', '--unroll=2',
          '--delay=3', '--bits=2', '--seeds=0']
  args = [sys.executable, SCRIPT, '--experiment=fid_mcheck_sg1e-15',
          f'--out={out}', *(f'--driver_flag={f}' for f in tiny)]
  first = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                         timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  (folder,) = out.iterdir()
  with open(folder / 'result.json') as f:
    result = json.load(f)
  assert result['flags']['sg_scale'] == 1e-15
  assert (folder / 'plot.png').read_bytes()[:4] == b'\x89PNG'
  mtime = (folder / 'result.json').stat().st_mtime
  second = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'exists (nothing to do)' in second.stdout
  assert (folder / 'result.json').stat().st_mtime == mtime


@pytest.mark.parametrize('args, message', [
    (['--experiment=fid_nope'], '--experiment=fid_nope: not one of '
     'table1_mnist_fcn, '),
    (['--experiment=fid_dni_1k'],
     '--data_dir is required: --experiment=fid_dni_1k reads mnist'),
    (['--experiment=fid_gpu_cifar', '--data_dir=/nonexistent'],
     '--data_dir=/nonexistent: not a folder'),
    (['--experiment=fid_recall_lr1e-3', '--data_dir=/tmp'],
     '--data_dir: --experiment=fid_recall_lr1e-3 reads no data'),
    (['--experiment=fid_recall_lr1e-3', '--num_steps=5'],
     '--num_steps: a train_ff grid flag; --experiment=fid_recall_lr1e-3 runs '
     'the flags docs/FIDELITY.md documents'),
    (['--experiment=fid_recall_lr1e-3', '--driver_flag=seeds=0'],
     '--driver_flag=seeds=0: must be a flag of the driver'),
    (['--experiment=table1_mnist_fcn', '--data_dir=/tmp',
      '--driver_flag=--seeds=0'],
     '--driver_flag: only for the fidelity experiments'),
])
def test_bad_input_one_line_and_nothing_written(tmp_path, capsys, args,
                                                message):
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as exit_info:
    _main(f'--out={out}', *args)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'reproduce.py: error: {message}')
  assert not out.exists()


def test_missing_data_files_one_line(tmp_path, capsys):
  """A folder without the dataset's files: the reader's one line, before
  anything is written."""
  out = tmp_path / 'out'
  with pytest.raises(SystemExit):
    _main(f'--out={out}', '--experiment=fid_multinet',
          f'--data_dir={tmp_path}')
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'missing mnist file' in err[0]
  assert not out.exists()


def test_print_command_names_the_documented_run(tmp_path, capsys):
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 8, 8)
  out = tmp_path / 'out'
  _main(f'--out={out}', '--experiment=fid_paper_lr', f'--data_dir={data_dir}',
        '--print_command')
  printed = shlex.split(capsys.readouterr().out.strip())
  assert os.path.basename(printed[1]) == 'fidelity_ff.py'
  assert printed[2:8] == ['--methods=bprop,dni', '--seeds=0',
                          '--learning_rates=3e-5', '--lr_schedule=constant',
                          '--num_steps=1000', f'--data_dir={data_dir}']
  assert printed[8] == f'--workdir={out / "fid_paper_lr"}'
  assert not out.exists()

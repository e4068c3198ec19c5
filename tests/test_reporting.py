"""report.py: paper-style table and learning curves from workdirs."""

import json
import os
import subprocess
import sys

import pytest

from dni_jax import reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(root, layers, method, errors, finished=True, dni_layers=None):
  workdir = root / f'fcn{layers}_{method}_{dni_layers}'
  workdir.mkdir()
  config = {'num_layers': layers, 'method': method}
  if dni_layers is not None:
    config['dni_layers'] = dni_layers
  (workdir / 'config.json').write_text(json.dumps(config))
  rows = [{'step': 100 * (i + 1), 'test_error': e, 'sg_cosine': [0.1 * i],
           'sg_l2_error': [1.0], 'sg_sign_error': [0.4]}
          for i, e in enumerate(errors)]
  (workdir / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows))
  if finished:
    (workdir / 'result.json').write_text(json.dumps(
        {'test_error': errors[-1], 'best_test_error': min(errors)}))
  return str(workdir)


def test_table_puts_ours_beside_the_paper(tmp_path):
  runs = [reporting.load_run(fake_run(tmp_path, 3, 'bprop', [5.0, 2.5])),
          reporting.load_run(fake_run(tmp_path, 3, 'cdni', [6.0, 3.0, 3.5])),
          reporting.load_run(fake_run(tmp_path, 4, 'cdni', [9.0], False))]
  table = reporting.feedforward_table(runs, 'mnist_fcn').splitlines()
  assert table[0] == ('| Layers | bprop ours | cdni ours | bprop paper | '
                      'cdni paper |')
  assert table[2] == '| 3 | 2.50 (2.50) | 3.50 (3.00) | 2.0 | 2.2 |'
  assert table[3] == '| 4 |  | unfinished | 1.8 | 1.9 |'


@pytest.mark.slow
def test_script_writes_table_and_png(tmp_path):
  dirs = [fake_run(tmp_path, 3, m, [9.0, 4.0]) for m in ('bprop', 'dni')]
  png = tmp_path / 'curves.png'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'report.py'),
       '--paper_table=mnist_fcn', f'--plot={png}', *dirs],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert '| 3 | 4.00 (4.00) | 4.00 (4.00) | 2.0 | 1.9 |' in proc.stdout
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_script_rejects_a_folder_that_is_not_a_workdir(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'report.py'),
       str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert 'no config.json' in proc.stderr and str(tmp_path) in proc.stderr


def test_single_dni_table_and_diagnostics_plot(tmp_path):
  runs = [reporting.load_run(fake_run(tmp_path, 6, 'dni', [5.0, 3.0], True, [k]))
          for k in (1, 2)]
  runs.append(reporting.load_run(fake_run(tmp_path, 6, 'bprop', [2.0])))
  table = reporting.single_dni_table(runs).splitlines()
  assert table[2:] == ['| bprop | none | 2.00 (2.00) |',
                       '| dni@1 | 1 | 3.00 (3.00) |',
                       '| dni@2 | 2 | 3.00 (3.00) |']
  png = tmp_path / 'diag.png'
  reporting.plot_diagnostics(runs, str(png))
  assert png.read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_reproduce_requires_its_flags(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'reproduce.py'),
       '--experiment=fig9a_single_dni', f'--out={tmp_path}'],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and '--data_dir is required' in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('flag, message', [
    ('--methods=dni,sgd', '--methods=dni,sgd: sgd not in '
     '--experiment=table1_cifar10_fcn (its methods: bprop,cdni,dni,no_bprop)'),
    ('--num_layers=7', '--num_layers=7: no run of '
     '--experiment=table1_cifar10_fcn has that depth'),
    ('--eval_every=0', '--eval_every=0: must be in [1, --num_steps=3000]'),
])
def test_reproduce_rejects_a_selection_outside_the_grid(tmp_path, flag,
                                                         message):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'reproduce.py'),
       '--experiment=table1_cifar10_fcn', f'--data_dir={tmp_path}',
       f'--out={tmp_path / "out"}', flag],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f'reproduce.py: error: {message}')
  assert not (tmp_path / 'out').exists()   # Nothing written.


@pytest.mark.slow
def test_reproduce_runs_only_the_selected_part_of_a_grid(tmp_path, mnist_dir):
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'reproduce.py'),
       '--experiment=table1_mnist_fcn', f'--data_dir={mnist_dir}',
       f'--out={out}', '--num_layers=3', '--methods=cdni,bprop',
       '--num_steps=10', '--eval_every=5', '--batch_size=32'],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
      'fcn3_bprop', 'fcn3_cdni']
  rows = [json.loads(line) for line in
          (out / 'fcn3_cdni' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [5, 10]
  report = (out / 'report.md').read_text()
  assert 'bprop ours' in report and 'cdni ours' in report
  assert 'no_bprop ours' not in report


def test_sparse_table(tmp_path):
  runs = []
  for p in (1.0, 0.5):
    w = fake_run(tmp_path, 4, 'dni', [4.0 / p], True, p)
    cfg = json.loads(open(os.path.join(w, 'config.json')).read())
    cfg.pop('dni_layers')
    cfg['p_update'] = p
    open(os.path.join(w, 'config.json'), 'w').write(json.dumps(cfg))
    runs.append(reporting.load_run(w))
  assert reporting.sparse_table(runs).splitlines() == [
      '| p_update | dni |', '|---|---|',
      '| 1 | 4.00 (4.00) |', '| 0.5 | 8.00 (8.00) |']


def test_runs_table_labels_unlock_and_sparse(tmp_path):
  w = fake_run(tmp_path, 4, 'cdni', [3.0, 2.0])
  cfg = json.loads(open(os.path.join(w, 'config.json')).read())
  cfg.update(synthetic_inputs=True, p_update=0.5)
  open(os.path.join(w, 'config.json'), 'w').write(json.dumps(cfg))
  assert reporting.runs_table([reporting.load_run(w)]).splitlines()[2] == (
      '| cdni unlock p=0.5 | 2.00 (2.00) |')


def test_stale_table_has_a_column_per_decay_and_the_paper(tmp_path):
  runs = []
  for layers, decay, errors in ((3, 0.0, [20.0, 12.0]), (3, 0.9, [15.0, 9.5]),
                                (4, 0.9, [30.0, 14.0])):
    workdir = tmp_path / f'{layers}_{decay}'
    workdir.mkdir()
    (workdir / 'config.json').write_text(json.dumps(
        {'num_layers': layers, 'method': 'stale', 'stale_decay': decay}))
    (workdir / 'result.json').write_text(json.dumps(
        {'test_error': errors[-1], 'best_test_error': min(errors)}))
    runs.append(reporting.load_run(str(workdir)))
  table = reporting.stale_table(runs).splitlines()
  assert table[0] == ('| Layers | stale decay=0 ours | stale decay=0.9 ours | '
                      'stale paper (best decay) |')
  assert table[2] == '| 3 | 12.00 (12.00) | 9.50 (9.50) | 9.1 |'
  assert table[3] == '| 4 |  | 14.00 (14.00) | 11.8 |'
  assert reporting.run_label(runs[1]) == 'stale decay=0.9'

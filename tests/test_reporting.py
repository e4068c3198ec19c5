"""report.py: paper-style table and learning curves from workdirs."""

import json
import os
import subprocess
import sys

from dni_jax import reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(root, layers, method, errors, finished=True):
  workdir = root / f'fcn{layers}_{method}'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(
      {'num_layers': layers, 'method': method}))
  rows = [{'step': 100 * (i + 1), 'test_error': e} for i, e in enumerate(errors)]
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


def test_script_rejects_a_folder_that_is_not_a_workdir(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'report.py'),
       str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert 'no config.json' in proc.stderr and str(tmp_path) in proc.stderr

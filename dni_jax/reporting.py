"""Paper-style tables and learning curves from finished workdirs."""

import json
import os
from typing import NamedTuple

# Table 1 of the paper, final test error (%) after 500k iterations; for
# comparison only -- never reported as ours.
PAPER_TABLE1 = {
    'mnist_fcn': {
        3: {'no_bprop': 9.3, 'bprop': 2.0, 'dni': 1.9, 'cdni': 2.2},
        4: {'no_bprop': 12.6, 'bprop': 1.8, 'dni': 2.2, 'cdni': 1.9},
        5: {'no_bprop': 16.2, 'bprop': 1.8, 'dni': 3.4, 'cdni': 1.7},
        6: {'no_bprop': 21.4, 'bprop': 1.8, 'dni': 4.3, 'cdni': 1.6},
    },
    'cifar10_fcn': {
        3: {'no_bprop': 54.9, 'bprop': 43.5, 'dni': 42.5, 'cdni': 48.5},
        4: {'no_bprop': 57.2, 'bprop': 43.0, 'dni': 45.0, 'cdni': 45.1},
        5: {'no_bprop': 59.6, 'bprop': 41.7, 'dni': 46.9, 'cdni': 43.5},
        6: {'no_bprop': 61.9, 'bprop': 42.0, 'dni': 49.7, 'cdni': 46.8},
    },
    'mnist_cnn': {
        3: {'no_bprop': 0.9, 'bprop': 0.8, 'dni': 0.9, 'cdni': 1.0},
        4: {'no_bprop': 2.8, 'bprop': 0.6, 'dni': 0.7, 'cdni': 0.8},
    },
    'cifar10_cnn': {
        3: {'no_bprop': 28.7, 'bprop': 17.9, 'dni': 19.5, 'cdni': 19.0},
        4: {'no_bprop': 38.1, 'bprop': 15.7, 'dni': 19.5, 'cdni': 16.4},
    },
}
# Sec. 3.1: the historical-gradient baseline, best over decays, MNIST FCN.
PAPER_STALE_MNIST_FCN = {3: 9.1, 4: 11.8, 5: 15.4, 6: 19.0}
METHOD_ORDER = ('no_bprop', 'bprop', 'dni', 'cdni', 'stale')


class Run(NamedTuple):
  workdir: str
  config: dict
  metrics: list[dict]
  result: dict | None   # None: the run has not finished.


def load_run(workdir: str) -> Run:
  def read(name):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)
  config = read('config.json')
  if config is None:
    raise ValueError(f'{workdir}: no config.json; not a dni_jax workdir')
  metrics = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      metrics = [json.loads(l) for l in f if l.strip()]
  return Run(workdir, config, metrics, read('result.json'))


def feedforward_table(runs: list[Run], paper: str | None = None) -> str:
  """Markdown: one row per depth, final (best) test error per method, with the
  paper's Table 1 value beside it when `paper` names one of its blocks."""
  cells: dict[int, dict[str, str]] = {}
  for run in runs:
    layers, method = run.config['num_layers'], run.config['method']
    if run.result is None:
      text = 'unfinished'
    else:
      text = (f'{run.result["test_error"]:.2f} '
              f'({run.result["best_test_error"]:.2f})')
    cells.setdefault(layers, {})[method] = text
  methods = [m for m in METHOD_ORDER if any(m in c for c in cells.values())]
  reference = PAPER_TABLE1.get(paper, {}) if paper else {}
  header = ['Layers'] + [f'{m} ours' for m in methods]
  if reference:
    header += [f'{m} paper' for m in methods]
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for layers in sorted(cells):
    row = [str(layers)] + [cells[layers].get(m, '') for m in methods]
    if reference:
      row += [str(reference.get(layers, {}).get(m, '')) for m in methods]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def run_label(run: Run) -> str:
  """'cdni', or 'dni@3' for a DNI only after layer 3."""
  label = run.config['method']
  if run.config.get('dni_layers') is not None:
    label += '@' + ','.join(map(str, run.config['dni_layers']))
  if run.config.get('synthetic_inputs'):
    label += ' unlock'
  if run.config.get('p_update', 1.0) < 1:
    label += f' p={run.config["p_update"]:g}'
  if run.config['method'] == 'stale':
    label += f' decay={run.config["stale_decay"]:g}'
  return label


def _error_text(run: Run) -> str:
  if run.result is None:
    return 'unfinished'
  return (f'{run.result["test_error"]:.2f} '
          f'({run.result["best_test_error"]:.2f})')


def stale_table(runs: list[Run]) -> str:
  """Sec. 3.1's historical-gradient baseline: final (best) test error per
  depth and decay, the paper's best-over-decays value beside it."""
  cells: dict[int, dict[float, str]] = {}
  for run in runs:
    cells.setdefault(run.config['num_layers'], {})[
        run.config['stale_decay']] = _error_text(run)
  decays = sorted({d for c in cells.values() for d in c})
  lines = ['| Layers | ' + ' | '.join(f'stale decay={d:g} ours'
                                       for d in decays)
           + ' | stale paper (best decay) |',
           '|' + '---|' * (len(decays) + 2)]
  for layers in sorted(cells):
    lines.append(f'| {layers} | ' + ' | '.join(
        cells[layers].get(d, '') for d in decays)
                 + f' | {PAPER_STALE_MNIST_FCN.get(layers, "")} |')
  return '\n'.join(lines)


def runs_table(runs: list[Run]) -> str:
  """One row per run: its label and final (best) test error."""
  lines = ['| run | test error % (best) |', '|---|---|']
  for run in runs:
    error = ('unfinished' if run.result is None else
             f'{run.result["test_error"]:.2f} '
             f'({run.result["best_test_error"]:.2f})')
    lines.append(f'| {run_label(run)} | {error} |')
  return '\n'.join(lines)


def _sort_key(run: Run):
  method = run.config['method']
  return (METHOD_ORDER.index(method) if method in METHOD_ORDER else 99,
          run.config.get('dni_layers') or [])


def single_dni_table(runs: list[Run]) -> str:
  """Fig. 9a as a table: final (best) test error per DNI position."""
  lines = ['| run | DNI after layer | test error % (best) |', '|---|---|---|']
  for run in sorted(runs, key=_sort_key):
    where = run.config.get('dni_layers')
    where = ','.join(map(str, where)) if where is not None else (
        'none' if run.config['method'] == 'bprop' else 'every layer')
    error = ('unfinished' if run.result is None else
             f'{run.result["test_error"]:.2f} '
             f'({run.result["best_test_error"]:.2f})')
    lines.append(f'| {run_label(run)} | {where} | {error} |')
  return '\n'.join(lines)


def sparse_table(runs: list[Run]) -> str:
  """Fig. 5 left as a table: final (best) test error per p_update and method."""
  cells: dict[float, dict[str, str]] = {}
  for run in runs:
    p = run.config.get('p_update', 1.0)
    cells.setdefault(p, {})[run.config['method']] = (
        'unfinished' if run.result is None else
        f'{run.result["test_error"]:.2f} ({run.result["best_test_error"]:.2f})')
  labels = [m for m in METHOD_ORDER if any(m in c for c in cells.values())]
  lines = ['| p_update | ' + ' | '.join(labels) + ' |',
           '|' + '---|' * (len(labels) + 1)]
  for p in sorted(cells, reverse=True):
    lines.append(f'| {p:g} | ' + ' | '.join(cells[p].get(l, '')
                                             for l in labels) + ' |')
  return '\n'.join(lines)


def plot_diagnostics(runs: list[Run], path: str) -> None:
  """Fig. 10: synthetic-gradient L2 error, cosine and sign error vs step."""
  plt = pyplot()
  keys = ('sg_l2_error', 'sg_cosine', 'sg_sign_error')
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for run in sorted(runs, key=_sort_key):
      rows = [m for m in run.metrics if key in m]
      if not rows:
        continue
      for i in range(len(rows[0][key])):
        suffix = f' #{i + 1}' if len(rows[0][key]) > 1 else ''
        ax.plot([m['step'] for m in rows], [m[key][i] for m in rows],
                label=run_label(run) + suffix)
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
  axes[0][-1].legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def pyplot():
  """matplotlib.pyplot on the Agg backend (files, no display); matplotlib is
  imported only when a plot is made."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_learning_curves(runs: list[Run], path: str,
                         key: str = 'test_error') -> None:
  """One panel per depth, one test-error curve per run; saved as PNG."""
  plt = pyplot()
  depths = sorted({r.config['num_layers'] for r in runs})
  fig, axes = plt.subplots(1, len(depths), figsize=(4 * len(depths), 3.2),
                           squeeze=False, sharey=True)
  for ax, depth in zip(axes[0], depths):
    for run in sorted((r for r in runs if r.config['num_layers'] == depth),
                      key=_sort_key):
      steps = [m['step'] for m in run.metrics]
      values = [m[key] for m in run.metrics]
      ax.plot(steps, values, marker='.', label=run_label(run))
    ax.set_title(f'{depth} layers')
    ax.set_xlabel('step')
    ax.set_yscale('log')
    ax.grid(True, which='both', alpha=0.3)
  axes[0][0].set_ylabel(key.replace('_', ' ') + (' (%)' if 'error' in key
                                                  else ''))
  axes[0][-1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

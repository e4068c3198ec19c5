r"""Tables and curves from `train_rnn.py` workdirs (Table 2, Fig. 7).

  python scripts/plot_rnn.py --plot=docs/fig7_ptb_time.png RUNS/ptb_*
  python scripts/plot_rnn.py --plot=docs/fig7_repeat_copy.png RUNS/repeat_*

PTB workdirs: a Markdown table (best validation BPC, test BPC at it, steps/s)
and, with --plot, validation BPC against training wall-clock time (Fig. 7
right; DNI solid, BPTT dashed). Copy / Repeat Copy workdirs: the table of the
largest T_task solved and the samples it took, and the T_task solved against
samples consumed (Fig. 7 left). Needs matplotlib for --plot.
"""

import json
import os
import sys

from absl import app
from absl import flags

from dni_jax import reporting

flags.DEFINE_string('plot', None, 'Write the curves to this PNG.')
FLAGS = flags.FLAGS

_ORDER = {'bptt': 0, 'dni': 1, 'dni_aux': 2}
_LABEL = {'bptt': 'BPTT', 'dni': 'DNI', 'dni_aux': 'DNI+Aux'}


def _load(workdir):
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise ValueError(f'{workdir}: no config.json; not a dni_jax workdir')
  with open(config_path) as f:
    config = json.load(f)
  if 'task' not in config or 'unroll' not in config:
    kind = ('a train_multinet.py run: use scripts/plot_multinet.py'
            if 'tick' in config else
            'a train_ff.py run: use scripts/report.py'
            if 'num_layers' in config else 'not a train_rnn.py run')
    raise ValueError(f'{workdir}: {kind} (plot_rnn.py reads train_rnn.py '
                     'workdirs)')
  result_path = os.path.join(workdir, 'result.json')
  if not os.path.exists(result_path):
    raise ValueError(f'{result_path} is missing: the run has not finished')
  with open(result_path) as f:
    result = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return config, result, rows


def _table(runs):
  task = runs[0][0]['task']
  if any(c['task'] != task for c, _, _ in runs):
    raise ValueError('give workdirs of one task at a time')
  runs = sorted(runs, key=lambda r: (r[0]['unroll'], _ORDER[r[0]['method']]))
  if task == 'ptb':
    lines = ['| method | T | hidden | steps | best valid BPC | test BPC | '
             'steps/s |', '|---|---|---|---|---|---|---|']
    for c, r, _ in runs:
      lines.append(f'| {_LABEL[c["method"]]} | {c["unroll"]} | '
                   f'{c["hidden_size"]} | {r["num_steps"]} | '
                   f'{r["best_valid_bpc"]:.3f} | {r["test_bpc"]:.3f} | '
                   f'{r["steps_per_sec"]:.0f} |')
  else:
    lines = ['| method | T | hidden | steps | max T_task solved | samples to '
             'solve it | unsolved level N, R | its bits error at the end |',
             '|---|---|---|---|---|---|---|---|']
    for c, r, rows in runs:
      level = r['final_level']
      lines.append(f'| {_LABEL[c["method"]]} | {c["unroll"]} | '
                   f'{c["hidden_size"]} | {r["num_steps"]} | '
                   f'{r["max_task_length"]} | {r["samples_seen"]} | '
                   f'{level["n"]}, {level["r"]} | {rows[-1]["bits_error"]:.2f} |')
  return '\n'.join(lines)


def _plot(runs, path):
  plt = reporting.pyplot()
  task = runs[0][0]['task']
  fig, ax = plt.subplots(figsize=(7, 4.5))
  unrolls = sorted({c['unroll'] for c, _, _ in runs})
  colours = {t: plt.cm.viridis(i / max(len(unrolls) - 1, 1))
             for i, t in enumerate(unrolls)}
  styles = {'bptt': '--', 'dni': '-', 'dni_aux': ':'}
  for c, r, rows in sorted(runs, key=lambda r: (r[0]['unroll'],
                                                _ORDER[r[0]['method']])):
    label = f'{_LABEL[c["method"]]} T={c["unroll"]}'
    if task == 'ptb':
      xs = [row['train_time'] for row in rows]
      ys = [row['valid_bpc'] for row in rows]
      label += f' ({r["test_bpc"]:.2f})'
    else:
      xs = [row['samples_seen'] for row in rows]
      ys, solved = [], 0   # The largest T_task solved so far (0: none).
      for row in rows:
        solved = row['task_length'] if row.get('solved') else solved
        ys.append(solved)
    ax.plot(xs, ys, styles[c['method']], color=colours[c['unroll']],
            drawstyle='default' if task == 'ptb' else 'steps-post',
            label=label)
  if task == 'ptb':
    ax.set_xlabel('training wall-clock time (s)')
    ax.set_ylabel('validation BPC')
    ax.set_title('Char-level PTB (bracketed: test BPC at best validation)')
  else:
    ax.set_xlabel('samples consumed (time steps x batch)')
    ax.set_ylabel('T_task solved')
    ax.set_title(task.replace('_', ' ').title())
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    print('plot_rnn.py: error: give at least one workdir', file=sys.stderr)
    sys.exit(1)
  try:
    runs = [_load(w) for w in workdirs]
    print(_table(runs))
  except (ValueError, OSError, KeyError) as e:
    print(f'plot_rnn.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  if FLAGS.plot:
    _plot(runs, FLAGS.plot)
    print(f'\nwrote {FLAGS.plot}')


if __name__ == '__main__':
  app.run(main)

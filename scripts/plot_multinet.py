r"""Fig. 8(b) from `train_multinet.py` workdirs: test error of Network A (top)
and Network B (bottom) against training steps, one curve per mode, and a
Markdown table (final and best errors, steps to the thresholds, updates).

  python scripts/plot_multinet.py --plot=docs/fig8b_multinet.png \
      --a_threshold=20 --b_threshold=40 RUNS/multinet/*

Steps to threshold: the first evaluated step whose test error is at or below
the threshold ('-' if never). Needs matplotlib for --plot.
"""

import json
import os
import sys

from absl import app
from absl import flags

from dni_jax import reporting

flags.DEFINE_string('plot', None, 'Write the curves to this PNG.')
flags.DEFINE_float('a_threshold', 20.0,
                   "Network A's test error (%) for steps-to-threshold.")
flags.DEFINE_float('b_threshold', 40.0,
                   "Network B's test error (%) for steps-to-threshold.")
FLAGS = flags.FLAGS

_ORDER = {'backprop': 0, 'dni': 1, 'decoupled': 2}
# The paper's colours: grey backprop, blue DNI, red decoupled without DNI.
_STYLE = {'backprop': ('grey', 'backprop (one graph, update every T^2)'),
          'dni': ('tab:blue', 'DNI (A every T steps)'),
          'decoupled': ('tab:red', 'decoupled, no DNI')}
PAPER_SG_SCALE = 10.0   # A.4.


def _label(config):
  """(colour, label, line style): DNI runs with another sg_scale than the
  paper's are dashed and say their scale."""
  colour, label = _STYLE[config['mode']]
  scale = config.get('sg_scale')
  if config['mode'] == 'dni':
    label = f'{label}, sg_scale {scale:g}'
    return colour, label, '-' if scale == PAPER_SG_SCALE else '--'
  return colour, label, '-'


def _load(workdir):
  paths = {name: os.path.join(workdir, name)
           for name in ('config.json', 'result.json', 'metrics.jsonl')}
  for path in paths.values():
    if not os.path.exists(path):
      raise ValueError(f'{path} is missing' + (
          ': the run has not finished' if path.endswith('result.json')
          else ''))
  with open(paths['config.json']) as f:
    config = json.load(f)
  if 'mode' not in config or 'tick' not in config:
    raise ValueError(f'{paths["config.json"]}: not a train_multinet.py run')
  with open(paths['result.json']) as f:
    result = json.load(f)
  with open(paths['metrics.jsonl']) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return config, result, rows


def steps_to(rows, key, threshold):
  for row in rows:
    if row[key] <= threshold:
      return row['step']
  return None


def table(runs, a_threshold, b_threshold):
  lines = [
      f'| mode | sg_scale | T | steps | A updates | B updates | A final / best test '
      f'error % | B final / best test error % | steps to A <= {a_threshold:g}% '
      f'| steps to B <= {b_threshold:g}% | steps/s |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  for c, r, rows in runs:
    a_steps = steps_to(rows, 'a_test_error', a_threshold)
    b_steps = steps_to(rows, 'b_test_error', b_threshold)
    rate = r.get('steps_per_sec')
    rate = f'{rate:.0f}' if rate else '-'
    lines.append(
        f'| {c["mode"]} | {c.get("sg_scale") or "-"} | {c["tick"]} | {r["num_steps"]} | {r["a_updates"]} | '
        f'{r["b_updates"]} | {r["a_test_error"]:.2f} / '
        f'{r["best_a_test_error"]:.2f} | {r["b_test_error"]:.2f} / '
        f'{r["best_b_test_error"]:.2f} | {a_steps or "-"} | {b_steps or "-"} | '
        f'{rate} |')
  return '\n'.join(lines)


def plot(runs, path):
  plt = reporting.pyplot()
  fig, axes = plt.subplots(2, 1, figsize=(6.5, 7), sharex=True)
  for c, _, rows in runs:
    colour, label, style = _label(c)
    steps = [r['step'] for r in rows]
    for ax, key in zip(axes, ('a_test_error', 'b_test_error')):
      ax.plot(steps, [r[key] for r in rows], color=colour, label=label,
              linestyle=style)
  ticks = sorted({c['tick'] for c, _, _ in runs})
  axes[0].set_title(f'Network A: odd digits in the last T steps '
                    f'(T = {", ".join(map(str, ticks))})')
  axes[1].set_title('Network B: 3s in the last T^2 steps')
  for ax in axes:
    ax.set_ylabel('test error (%)')
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
  axes[1].set_xlabel('steps (digits seen per stream)')
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    print('plot_multinet.py: error: give one or more train_multinet.py '
          'workdirs', file=sys.stderr)
    sys.exit(1)
  try:
    runs = sorted((_load(w) for w in workdirs),
                  key=lambda run: (run[0]['tick'], _ORDER[run[0]['mode']],
                                   -(run[0].get('sg_scale') or 0)))
    print(table(runs, FLAGS.a_threshold, FLAGS.b_threshold))
    if FLAGS.plot:
      plot(runs, FLAGS.plot)
      print(f'wrote {FLAGS.plot}')
  except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
    print(f'plot_multinet.py: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)

"""The driver of `scripts/fidelity_rnn.py`: the recall, two-network and PTB
experiments, one run per (method, seed), each written to
`<workdir>/<experiment>/<method>_seed<k>.json` and skipped when that file
exists; `summary.json` holds mean and spread over seeds.

`settings` below is the script's flag values (absl's FLAGS, or any object
with attributes of the same names)."""

import json
import math
import os
from typing import Any

from dni_jax import recurrent
from dni_jax.fidelity import plots
from dni_jax.fidelity import ptb
from dni_jax.fidelity import recall
from dni_jax.fidelity import two_networks
from dni_jax.fidelity.stats import mean_spread

EXPERIMENTS = ('recall', 'multinet', 'ptb')
METHODS = {'recall': recurrent.METHODS, 'multinet': two_networks.MODES,
           'ptb': ptb.METHODS}


def summarize(results: list[dict]) -> dict[str, Any]:
  """Per method: mean and spread over seeds of every final_ / best_ / mean_ /
  peak_ number and of the last evaluation's cosines."""
  summary = {}
  for method in sorted({r['method'] for r in results}):
    runs = [r for r in results if r['method'] == method]
    keys = [k for k in runs[0]
            if k.startswith(('final_', 'best_', 'mean_', 'peak_'))]
    entry = {k: mean_spread([r[k] for r in runs]) for k in keys}
    entry['seeds'] = [r['seed'] for r in runs]
    last = runs[0]['rows'][-1]
    if 'boundaries' in last and last['boundaries']:
      for name in ('cos_param_grad_sg_true', 'cos_sg_true',
                   'cos_sg_true_per_example', 'cos_target_true'):
        entry['final_' + name] = mean_spread(
            [r['rows'][-1]['boundaries'][0][name] for r in runs])
    for name in ('cos_m_message_only', 'cos_probe_message_state',
                 'cos_probe_message_state_labels', 'cos_m_message_state'):
      if name in last:
        entry['final_' + name] = mean_spread(
            [r['rows'][-1][name] for r in runs])
    summary[method] = entry
  return summary



def _check(settings) -> tuple[list[str], list[int]]:
  """The flags every experiment reads, checked: (methods, seeds)."""
  if not settings.workdir:
    raise ValueError('--workdir is required')
  allowed = METHODS[settings.experiment]
  methods = settings.methods or list(allowed)
  for m in methods:
    if m not in allowed:
      raise ValueError(f'--methods: {m!r} is not one of {", ".join(allowed)}'
                       f' (--experiment={settings.experiment})')
  seeds = recall.parse_seeds(settings)
  recall.check_positive(settings, (
      'num_steps', 'eval_every', 'batch_size', 'hidden_size', 'eval_batch',
      'tick', 'eval_streams', 'eval_blocks'))
  for name in ('learning_rate', 'sg_scale'):
    value = getattr(settings, name)
    if value is not None and not (value > 0 and math.isfinite(value)):
      raise ValueError(f'--{name}={value}: must be a positive finite number')
  if settings.cost_only and settings.experiment != 'ptb':
    raise ValueError(f'--cost_only is for --experiment=ptb (got '
                     f'--experiment={settings.experiment})')
  return methods, seeds


def run_experiment(settings) -> None:
  """`scripts/fidelity_rnn.py`: checks every flag and reads the data before
  anything is written, then every (seed, method) run not yet on disk, the
  summary (printed and written) and --plot."""
  methods, seeds = _check(settings)
  data = None
  if settings.experiment == 'recall':
    recall.check_recall(settings.unroll, settings.delay, settings.bits)
  elif settings.experiment == 'ptb':
    ptb.check_flags(settings)
    data = ptb.load_data(settings.data_dir)
    if settings.cost_only:
      print(json.dumps(ptb.step_costs(settings, methods,
                                      len(data['train'].vocab)), indent=1))
      return
  else:
    block = settings.tick ** 2
    for name in ('num_steps', 'eval_every'):
      if getattr(settings, name) % block:
        raise ValueError(f'--{name}={getattr(settings, name)}: must be a '
                         f'multiple of tick^2 = {block}')
    data = two_networks.load_mnist(settings.data_dir)
  out = os.path.join(settings.workdir, settings.experiment)
  os.makedirs(out, exist_ok=True)
  results = []
  for seed in seeds:
    for method in methods:
      path = os.path.join(out, f'{method}_seed{seed}.json')
      if os.path.exists(path):
        with open(path) as f:
          results.append(json.load(f))
        continue
      if settings.experiment == 'recall':
        result = recall.run_recall(settings, method, seed)
      elif settings.experiment == 'ptb':
        result = ptb.run_ptb(settings, method, seed, data)
      else:
        result = two_networks.run_multinet(settings, method, seed, data)
      recall.write_json(path, result)
      results.append(result)
      print(f'{method} seed {seed}: ' + ', '.join(
          f'{k}={v}' for k, v in result.items()
          if k.startswith(('final_', 'best_', 'mean_', 'wall'))), flush=True)
  summary = summarize(results)
  recall.write_json(os.path.join(out, 'summary.json'), summary)
  print(json.dumps(summary, indent=1))
  if settings.plot:
    plot = plots.plot_ptb if settings.experiment == 'ptb' else plots.plot_rnn
    plot(results, settings.plot)

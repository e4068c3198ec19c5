"""The feed-forward fidelity experiment behind `scripts/fidelity_ff.py`: a
grid of runs (methods x depths x learning rates x step budgets x seeds), each
with the ground-truth diagnostics of `ff_diagnostics` at every evaluation on
fixed probes of training and test images; resumable runs, seed statistics.

`settings` below is the script's flag values (absl's FLAGS, or any object
with attributes of the same names)."""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import data
from dni_jax import experiments
from dni_jax import feedforward
from dni_jax import training
from dni_jax.fidelity import plots
from dni_jax.fidelity.ff_diagnostics import ground_truth_diagnostics
from dni_jax.fidelity.stats import seed_stats


INPUT_SHAPES = {'mnist': (28, 28, 1), 'fashion_mnist': (28, 28, 1),
                'cifar10': (32, 32, 3)}


def run_name(dataset, model, num_layers, method, lr, steps, seed,
             decay=None) -> str:
  extra = f'_d{decay:g}' if method == 'stale' else ''
  return (f'{dataset}_{model}{num_layers}_{method}{extra}_lr{lr:g}_{steps}'
          f'_s{seed}')


def model_config(settings, num_layers, method, lr, steps, seed, decay
                 ) -> feedforward.FeedForwardConfig:
  """One run's network: --dataset, --model and A.1's sizes where
  --hidden_size / --sg_hidden_* are unset; --lr_schedule over `steps`."""
  dataset, model = settings.dataset, settings.model
  exp = experiments.FeedForwardExperiment(
      workdir='unused', dataset=dataset, model=model, num_layers=num_layers,
      hidden_size=settings.hidden_size, method=method,
      sg_hidden_layers=settings.sg_hidden_layers,
      sg_hidden_size=settings.sg_hidden_size, learning_rate=lr,
      batch_size=settings.batch_size, num_steps=steps, seed=seed,
      stale_decay=decay if decay is not None else 0.9,
      lr_boundaries=())
  boundaries = ((int(0.6 * steps), int(0.8 * steps))
                if settings.lr_schedule == 'step' else ())
  boundaries = tuple(b for b in boundaries if b > 0)
  return feedforward.FeedForwardConfig(
      input_shape=INPUT_SHAPES[dataset], num_classes=10, model=model,
      num_layers=num_layers,
      hidden_size=exp.resolved_hidden_size, method=method,
      sg_hidden_layers=exp.resolved_sg_hidden_layers,
      sg_hidden_size=exp.resolved_sg_hidden_size, learning_rate=lr,
      lr_boundaries=tuple(sorted(set(boundaries))),
      stale_decay=exp.stale_decay, batch_size=settings.batch_size, seed=seed)


def step_flops(config: feedforward.FeedForwardConfig, batch_size: int) -> float:
  """XLA's FLOP count of one fused training step (compiled, not run)."""
  ff = feedforward.make_feedforward(config)
  state = jax.eval_shape(ff.init, jax.random.key(0))
  images = jax.ShapeDtypeStruct((batch_size,) + tuple(config.input_shape),
                                jnp.float32)
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  cost = ff.train_step.lower(state, images, labels).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def _record(config: feedforward.FeedForwardConfig, steps: int) -> dict:
  model = {} if config.model == 'fcn' else {'model': config.model}
  return {**model, 'method': config.method, 'num_layers': config.num_layers,
          'hidden_size': config.hidden_size,
          'sg_hidden_layers': config.sg_hidden_layers,
          'sg_hidden_size': config.sg_hidden_size,
          'learning_rate': config.learning_rate,
          'lr_boundaries': list(config.lr_boundaries),
          'stale_decay': config.stale_decay, 'batch_size': config.batch_size,
          'seed': config.seed, 'num_steps': steps}


def train_run(run_dir: str, config: feedforward.FeedForwardConfig, steps: int,
              train, test, probes, num_evals: int, top_fraction: float) -> dict:
  """One run with ground-truth diagnostics at every evaluation; resumable."""
  record = _record(config, steps)
  result_path = os.path.join(run_dir, 'result.json')
  ff = feedforward.make_feedforward(config)
  diag = jax.jit(lambda s, x, y: ground_truth_diagnostics(
      ff.modules, s, x, y, top_fraction))
  def diagnose(state) -> dict:
    out = {}
    if config.interfaces:
      for split, (x, y) in probes.items():
        d = jax.device_get(diag(state, x, y))
        for k, v in d.items():
          out[f'{split}_{k}'] = np.round(np.asarray(v, np.float64),
                                         5).tolist()
    return out
  state = ff.init(jax.random.key(config.seed))
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
    if result['config'] != record:
      raise ValueError(f'{run_dir} holds a run with another configuration '
                       '(use another --workdir)')
    if 'final' not in result:
      # A run finished before the diagnostics grew: recompute them all on
      # its last checkpoint.
      checkpointer = training.Checkpointer(run_dir, max_to_keep=1)
      step, payload = checkpointer.restore_latest({'state': state})
      checkpointer.close()
      if step != steps:
        raise ValueError(f'{run_dir}: the last checkpoint is at step {step}, '
                         f'not {steps}')
      result['final'] = diagnose(payload['state'])
      training.write_json_atomic(result_path, result)
    return result
  os.makedirs(run_dir, exist_ok=True)
  rows_path = os.path.join(run_dir, 'rows.json')
  checkpointer = training.Checkpointer(run_dir, max_to_keep=1)
  start, payload = checkpointer.restore_latest({'state': state})
  rows = []
  if payload is not None:
    state = payload['state']
    with open(rows_path) as f:
      rows = [r for r in json.load(f)['rows'] if r['step'] <= start]
  sampler = training.EpochSampler(len(train.labels), config.batch_size,
                                  config.seed)
  eval_steps = sorted({max(1, round(steps * (k + 1) / num_evals))
                       for k in range(num_evals)})
  losses = []
  t0 = time.time()
  for step in range(start, steps):
    idx = sampler.indices(step)
    state, metrics = ff.train_step(state, train.images[idx],
                                   train.labels[idx])
    losses.append(metrics['loss'])
    if step + 1 in eval_steps:
      loss = float(np.mean(jax.device_get(losses)))
      if not math.isfinite(loss):
        raise training.TrainingError(f'{run_dir}: non-finite training loss '
                                     f'at step {step + 1}')
      losses = []
      row = {'step': step + 1, 'train_loss': round(loss, 6),
             'seconds': round(time.time() - t0, 2)}
      row.update(training.evaluate(ff.eval_batch, state, test.images,
                                   test.labels))
      row.update(diagnose(state))
      rows.append(row)
      training.write_json_atomic(rows_path, {'rows': rows})
      checkpointer.save(step + 1, {'state': state})
      print(f'{os.path.basename(run_dir)} step {step + 1}: train loss '
            f'{loss:.4f} test error {row["test_error"]:.2f}% '
            f'({time.time() - t0:.0f}s)', flush=True)
  checkpointer.close()
  result = {'config': record, 'rows': rows, 'final': diagnose(state),
            'test_error': rows[-1]['test_error'],
            'best_test_error': min(r['test_error'] for r in rows),
            'device': jax.devices()[0].device_kind}
  training.write_json_atomic(result_path, result)
  return result


CURVE_KEYS = ('train_loss', 'test_error', 'train_sg_cos', 'train_sg_cos_hi',
              'train_sg_cos_pooled', 'train_target_cos', 'train_update_cos',
              'train_fit_r2')


def curve(runs: list[dict]) -> dict:
  """Seed statistics at every evaluation of runs with the same evaluation
  steps: {'step': [...], key: seed_stats over seeds of [steps(, interfaces)]}
  for each of CURVE_KEYS present in every row ({} if the steps differ)."""
  steps = [[r['step'] for r in run['rows']] for run in runs]
  if any(s != steps[0] for s in steps):
    return {}
  out = {'step': steps[0]}
  for key in CURVE_KEYS:
    if all(key in r for run in runs for r in run['rows']):
      out[key] = seed_stats([[r[key] for r in run['rows']] for run in runs])
  return out


def summarise(results: dict[str, dict]) -> dict:
  """Per group of seeds: mean, std and range of the final test error and
  training loss, of every final diagnostic (per interface), and of the
  CURVE_KEYS at every evaluation ('curve')."""
  groups = {}
  for name, res in results.items():
    groups.setdefault(name.rsplit('_s', 1)[0], []).append(res)
  summary = {}
  for key, runs in sorted(groups.items()):
    entry = {'seeds': len(runs),
             'test_error': seed_stats([r['test_error'] for r in runs]),
             'train_loss': seed_stats(
                 [r['rows'][-1]['train_loss'] for r in runs])}
    finals = [r.get('final', {}) for r in runs]
    for k in sorted(set.intersection(*(set(f) for f in finals))):
      entry[k] = seed_stats([f[k] for f in finals])
    entry['curve'] = curve(runs)
    summary[key] = entry
  return summary



# ---------------------------------------------------------------------------
# The grid.
# ---------------------------------------------------------------------------

def _parse(settings, flag: str, cast) -> list:
  values = getattr(settings, flag)
  try:
    out = [cast(v) for v in values if v.strip()]
  except ValueError:
    raise ValueError(f'--{flag}={",".join(values)}: not a list of '
                     f'{cast.__name__}') from None
  if not out:
    raise ValueError(f'--{flag} is empty')
  return out


def parse_grid(settings) -> dict[str, list]:
  """The grid's axes from the list flags, checked (one-line ValueErrors):
  {'methods', 'depths', 'seeds', 'lrs', 'budgets', 'decays'}."""
  if not settings.workdir:
    raise ValueError('--workdir is required')
  methods = _parse(settings, 'methods', str)
  for m in methods:
    if m not in feedforward.METHODS:
      raise ValueError(f'--methods: {m!r} is not one of '
                       f'{", ".join(feedforward.METHODS)}')
  grid = {'methods': methods,
          'depths': _parse(settings, 'num_layers', int),
          'seeds': _parse(settings, 'seeds', int),
          'lrs': _parse(settings, 'learning_rates', float),
          'budgets': _parse(settings, 'num_steps', int),
          'decays': _parse(settings, 'stale_decays', float)}
  if any(d < 2 for d in grid['depths']):
    raise ValueError('--num_layers: every depth must be >= 2')
  if any(s < 0 for s in grid['seeds']):
    raise ValueError('--seeds: must be >= 0')
  if any(not (lr > 0 and math.isfinite(lr)) for lr in grid['lrs']):
    raise ValueError('--learning_rates: must be positive finite numbers')
  if any(b < 1 for b in grid['budgets']):
    raise ValueError('--num_steps: must be >= 1')
  if any(not 0 <= d < 1 for d in grid['decays']):
    raise ValueError('--stale_decays: must be in [0, 1)')
  for flag in ('batch_size', 'num_evals', 'probe_size'):
    if getattr(settings, flag) < 1:
      raise ValueError(f'--{flag}={getattr(settings, flag)}: must be >= 1')
  if not 0 < settings.top_fraction <= 1:
    raise ValueError(f'--top_fraction={settings.top_fraction}: must be in '
                     '(0, 1]')
  if settings.train_limit is not None and settings.train_limit < 1:
    raise ValueError(f'--train_limit={settings.train_limit}: must be >= 1')
  return grid


def print_costs(settings, grid: dict[str, list]) -> None:
  """--cost_only: XLA's FLOPs of one step per depth and method, and the
  total of each step budget; trains and writes nothing."""
  for depth in grid['depths']:
    for method in grid['methods']:
      config = model_config(settings, depth, method, grid['lrs'][0],
                            grid['budgets'][0], grid['seeds'][0],
                            grid['decays'][0])
      flops = step_flops(config, settings.batch_size)
      totals = ', '.join(f'{b} steps: {flops * b / 1e15:.3g} PFLOP'
                         for b in grid['budgets'])
      print(f'{settings.dataset} {settings.model}{depth} {method}: '
            f'{flops / 1e9:.4g} GFLOP/step at batch {settings.batch_size}; '
            f'{totals}')


def print_summary(summary: dict) -> None:
  for key, entry in summary.items():
    e, l = entry['test_error'], entry['train_loss']
    print(f'{key}: test error {e["mean"]:.2f} +- {e["std"]:.2f} '
          f'[{e["min"]:.2f}, {e["max"]:.2f}], train loss {l["mean"]:.4f} '
          f'over {entry["seeds"]} seeds')
    for k in ('sg_cos', 'sg_cos_hi', 'sg_cos_pooled', 'target_cos',
              'target_cos_hi', 'target_cos_pooled', 'fit_r2',
              'update_cos', 'sg_norm_ratio', 'true_norm_share_hi'):
      if f'train_{k}' in entry:
        d = entry[f'train_{k}']
        print(f'  train probe {k:18s} mean {d["mean"]}  '
              f'min {d["min"]}  max {d["max"]}')
    c = entry['curve']
    if 'train_loss' in c:
      print(f'  over training, steps {c["step"]}:')
      for k in ('train_loss', 'train_sg_cos_pooled'):
        if k in c:
          print(f'    {k} mean {c[k]["mean"]}  std {c[k]["std"]}')


def run_grid(settings) -> None:
  """`scripts/fidelity_ff.py`: every run of the grid (finished ones read
  back), the summary printed and written to --summary_json, --plot."""
  grid = parse_grid(settings)
  if settings.cost_only:
    print_costs(settings, grid)
    return
  # No --data_source flag here: errors do not suggest one.
  train = data.load_dataset(settings.dataset, 'train', settings.data_dir,
                            limit=settings.train_limit, tfds_hint=False)
  test = data.load_dataset(settings.dataset, 'test', settings.data_dir,
                           tfds_hint=False)
  if 'stale' in grid['methods'] and settings.probe_size > settings.batch_size:
    raise ValueError(f'--probe_size={settings.probe_size}: the stale baseline '
                     f'holds --batch_size={settings.batch_size} slots; use a '
                     'probe no larger')
  n = settings.probe_size
  probes = {'train': (train.images[:n], train.labels[:n]),
            'test': (test.images[:n], test.labels[:n])}
  results = {}
  for depth in grid['depths']:
    for method in grid['methods']:
      for lr in grid['lrs']:
        for steps in grid['budgets']:
          for decay in (grid['decays'] if method == 'stale' else [None]):
            for seed in grid['seeds']:
              name = run_name(settings.dataset, settings.model, depth, method,
                              lr, steps, seed, decay)
              config = model_config(settings, depth, method, lr, steps, seed,
                                    decay)
              results[name] = train_run(
                  os.path.join(settings.workdir, name), config, steps, train,
                  test, probes, settings.num_evals, settings.top_fraction)
  summary = summarise(results)
  print_summary(summary)
  if settings.summary_json:
    training.write_json_atomic(settings.summary_json,
                               {'summary': summary, 'runs': results})
  if settings.plot:
    plots.plot_ff(results, settings.plot)

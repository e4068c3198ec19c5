r"""Fidelity of the feed-forward claims (issue 18): ground-truth diagnostics.

Trains feed-forward networks over a grid (methods x depths x learning rates x
step budgets x seeds) and, at every evaluation, compares each interface's
gradient signals with the true backpropagated gradient at the same parameters
(`ground_truth_diagnostics`):

  sg        the synthetic gradient delta_hat_i = M_{i+1}(h_i) (or the stale
            memory) against the true per-example dL/dh_i;
  target    its bootstrapped regression target (Fig. 2: delta_hat_{i+1}
            pulled back through the block above; the true gradient at the
            top interface) against the true dL/dh_i;
  update    the parameter gradient the block below receives from delta_hat_i
            against the one the true gradient would give it (what the layer
            actually moves along).

Cosines are reported as the mean per-example cosine (what train_ff.py logs as
sg_cosine), the same over the top decile of examples by loss ("hi"), and pooled
(the cosine of the whole [B, D] arrays, which weights examples by their
gradient norms). Probes are fixed batches of training and test images.

Each run is resumable (orbax checkpoint of the state and the rows so far at
every evaluation, under WORKDIR/RUN/); finished runs are skipped. The summary
(every run's rows) goes to --summary_json and a plot to --plot.

Example (4-layer MNIST FCN, DNI vs Bprop, 3 seeds):
  python scripts/fidelity_ff.py --workdir=/tmp/fid --data_dir=PATH/mnist \
      --methods=bprop,dni --num_layers=4 --seeds=0,1,2 --learning_rates=3e-4 \
      --num_steps=3000 --summary_json=docs/fidelity_ff.json \
      --plot=docs/fidelity_ff.png
"""

import json
import math
import os
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dni_jax import cli
from dni_jax import data
from dni_jax import experiments
from dni_jax import feedforward
from dni_jax import interface
from dni_jax import training

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags (defined when run, so the diagnostics can be
  imported beside other scripts' flags)."""
  flags.DEFINE_string('workdir', None, 'Output folder of the runs (required).')
  flags.DEFINE_enum('dataset', 'mnist', list(data.DATASETS), 'Dataset.')
  flags.DEFINE_enum('model', 'fcn', list(feedforward.MODELS),
                    'fcn or cnn (A.1 sizes by default).')
  flags.DEFINE_bool('cost_only', False,
                    'Train nothing: print XLA\'s FLOP count of one fused '
                    'training step of each configuration, and the total of '
                    'each --num_steps budget (what a GPU run would cost).')
  flags.DEFINE_string('data_dir', None, 'IDX files / cifar-10-batches-bin/.')
  flags.DEFINE_list('methods', ['bprop', 'dni'],
                    'Methods (bprop, no_bprop, dni, cdni, stale).')
  flags.DEFINE_list('num_layers', ['4'],
                    'Depths (hidden layers + classifier).')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.DEFINE_list('learning_rates', ['3e-4'], 'Adam learning rates.')
  flags.DEFINE_list('num_steps', ['3000'], 'Step budgets (one run each).')
  flags.DEFINE_enum('lr_schedule', 'step', ['step', 'constant'],
                    'step: x0.1 at 60% and 80% of the run (A.1\'s shape); '
                    'constant: no decay.')
  flags.DEFINE_list('stale_decays', ['0.0'],
                    '--methods=stale: decays of the moving average, one run '
                    'each.')
  flags.DEFINE_integer('hidden_size', None, 'Units per hidden layer (A.1).')
  flags.DEFINE_integer('sg_hidden_layers', None,
                       'SG model hidden layers (A.1).')
  flags.DEFINE_integer('sg_hidden_size', None, 'SG model units (A.1).')
  flags.DEFINE_integer('batch_size', 256, 'Batch size.')
  flags.DEFINE_integer('num_evals', 10, 'Evaluations per run (evenly spaced).')
  flags.DEFINE_integer('probe_size', 512,
                       'Examples in each fixed diagnostic probe (train, test).')
  flags.DEFINE_float('top_fraction', 0.1,
                     'Fraction of highest-loss probe examples for the "hi" '
                     'cosines.')
  flags.DEFINE_integer('train_limit', None,
                       'Use only the first N training examples (tests).')
  flags.DEFINE_string('summary_json', None, 'Write all runs\' rows here.')
  flags.DEFINE_string('plot', None, 'Write a PNG of the diagnostics here.')


PROG = 'fidelity_ff.py'


# ---------------------------------------------------------------------------
# Ground truth.
# ---------------------------------------------------------------------------

def _per_example_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, 1e-30)


def _pooled_cosine(a: Any, b: Any) -> jax.Array:
  a = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a)])
  b = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b)])
  return jnp.sum(a * b) / jnp.maximum(
      jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)


def ground_truth_diagnostics(modules: feedforward.Modules,
                             state: feedforward.FeedForwardState,
                             images: jax.Array, labels: jax.Array,
                             top_fraction: float = 0.1) -> dict[str, jax.Array]:
  """Each interface's gradient signals against full backprop at `state`.

  Everything runs in training mode on one batch, as a training step would
  (BatchNorm batch statistics), and nothing is updated. Returns arrays with
  one value per interface, bottom up:

    {sg,target}_cos        mean over examples of the per-example cosine with
                           the true dL/dh_i;
    {sg,target}_cos_hi     the same over the ceil(top_fraction * B) examples
                           of highest loss;
    {sg,target}_cos_pooled cosine of the whole [B, ...] arrays;
    sg_norm_ratio          ||delta_hat_i|| / ||true|| over the batch;
    fit_cos_pooled, fit_r2 how well delta_hat_i fits its own regression
                           target: pooled cosine, and R^2 = 1 - SSE / (sum of
                           squares of the target about its batch mean);
    update_cos             cosine between the parameter gradients of the
                           block below interface i from delta_hat_i and from
                           the true gradient;
    true_norm_share_hi     share of the true gradient's squared norm held by
                           the high-loss examples.
  """
  models = modules.hidden + (modules.head,)
  outputs, vjps, _ = feedforward.chain_vjp(models, state.layers + (state.head,),
                                           images)
  logits = outputs[-1]
  loss_grad = interface.softmax_cross_entropy_grad(logits, labels)[1]
  per_example_loss = -jnp.take_along_axis(
      jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  _, true_grads = feedforward.chain_pull_back(vjps, loss_grad)
  num_hi = max(1, math.ceil(top_fraction * images.shape[0]))
  hi = jax.lax.top_k(per_example_loss, num_hi)[1]
  context = feedforward.context_for(modules, labels)
  interfaces = modules.interfaces
  rows = {k: [] for k in ('sg_cos', 'sg_cos_hi', 'sg_cos_pooled',
                          'target_cos', 'target_cos_hi', 'target_cos_pooled',
                          'sg_norm_ratio', 'update_cos', 'true_norm_share_hi',
                          'fit_cos_pooled', 'fit_r2')}
  ghats = []
  for j, layer in enumerate(interfaces):
    # The interface after layer k (1-based) carries h_k, the input of module k.
    h = outputs[layer - 1]
    if modules.use_synthetic:
      ghats.append(feedforward.synthetic_gradient(
          modules, state.synthetic[j], h, context))
    else:
      ghats.append(jnp.zeros_like(h))
  for j, layer in enumerate(interfaces):
    h, true, ghat = outputs[layer - 1], true_grads[layer], ghats[j]
    if j + 1 < len(interfaces):
      # Block j + 1 (hidden layers layer+1 .. interfaces[j+1]) pulls
      # delta_hat_{j+1} back to its input: interface j's regression target.
      block = modules.blocks[j + 1]
      _, block_vjps, _ = feedforward.chain_vjp(
          tuple(modules.hidden[i] for i in block),
          tuple(state.layers[i] for i in block), h)
      target = feedforward.chain_pull_back(block_vjps, ghats[j + 1])[1][0]
    else:
      target = true  # The top block's input gradient from the loss.
    # The block below: hidden layers blocks[j]; its parameter gradients.
    below = modules.blocks[j]
    grads_sg = feedforward.chain_pull_back(
        [vjps[i] for i in below], ghat)[0]
    grads_true = feedforward.chain_pull_back(
        [vjps[i] for i in below], true)[0]
    for name, signal in (('sg', ghat), ('target', target)):
      cos = _per_example_cosine(signal, true)
      rows[f'{name}_cos'].append(jnp.mean(cos))
      rows[f'{name}_cos_hi'].append(jnp.mean(cos[hi]))
      rows[f'{name}_cos_pooled'].append(_pooled_cosine(signal, true))
    rows['sg_norm_ratio'].append(
        jnp.linalg.norm(ghat) / jnp.maximum(jnp.linalg.norm(true), 1e-30))
    rows['update_cos'].append(_pooled_cosine(grads_sg, grads_true))
    rows['fit_cos_pooled'].append(_pooled_cosine(ghat, target))
    spread = jnp.sum(jnp.square(
        target - jnp.mean(target, axis=0, keepdims=True)))
    rows['fit_r2'].append(1.0 - jnp.sum(jnp.square(ghat - target))
                          / jnp.maximum(spread, 1e-30))
    sq = jnp.sum(jnp.square(true.reshape(true.shape[0], -1)), axis=-1)
    rows['true_norm_share_hi'].append(
        jnp.sum(sq[hi]) / jnp.maximum(jnp.sum(sq), 1e-30))
  out = {k: (jnp.stack(v) if v else jnp.zeros((0,), jnp.float32))
         for k, v in rows.items()}
  out['probe_loss'] = jnp.mean(per_example_loss)
  out['probe_error'] = 100.0 * jnp.mean(jnp.argmax(logits, -1) != labels)
  return out


# ---------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------

INPUT_SHAPES = {'mnist': (28, 28, 1), 'fashion_mnist': (28, 28, 1),
                'cifar10': (32, 32, 3)}


def run_name(dataset, model, num_layers, method, lr, steps, seed,
             decay=None) -> str:
  extra = f'_d{decay:g}' if method == 'stale' else ''
  return (f'{dataset}_{model}{num_layers}_{method}{extra}_lr{lr:g}_{steps}'
          f'_s{seed}')


def _config(dataset, model, num_layers, method, lr, steps, seed, decay,
            schedule) -> feedforward.FeedForwardConfig:
  exp = experiments.FeedForwardExperiment(
      workdir='unused', dataset=dataset, model=model, num_layers=num_layers,
      hidden_size=FLAGS.hidden_size, method=method,
      sg_hidden_layers=FLAGS.sg_hidden_layers,
      sg_hidden_size=FLAGS.sg_hidden_size, learning_rate=lr,
      batch_size=FLAGS.batch_size, num_steps=steps, seed=seed,
      stale_decay=decay if decay is not None else 0.9,
      lr_boundaries=())
  boundaries = ((int(0.6 * steps), int(0.8 * steps)) if schedule == 'step'
                else ())
  boundaries = tuple(b for b in boundaries if b > 0)
  return feedforward.FeedForwardConfig(
      input_shape=INPUT_SHAPES[dataset], num_classes=10, model=model,
      num_layers=num_layers,
      hidden_size=exp.resolved_hidden_size, method=method,
      sg_hidden_layers=exp.resolved_sg_hidden_layers,
      sg_hidden_size=exp.resolved_sg_hidden_size, learning_rate=lr,
      lr_boundaries=tuple(sorted(set(boundaries))),
      stale_decay=exp.stale_decay, batch_size=FLAGS.batch_size, seed=seed)


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


def _stats(values) -> dict:
  """Mean, std, min and max over the first axis (seeds)."""
  v = np.asarray(values, np.float64)
  return {'mean': np.round(v.mean(0), 4).tolist(),
          'std': np.round(v.std(0), 4).tolist(),
          'min': np.round(v.min(0), 4).tolist(),
          'max': np.round(v.max(0), 4).tolist()}


def curve(runs: list[dict]) -> dict:
  """Seed statistics at every evaluation of runs with the same evaluation
  steps: {'step': [...], key: _stats over seeds of [steps(, interfaces)]}
  for each of CURVE_KEYS present in every row ({} if the steps differ)."""
  steps = [[r['step'] for r in run['rows']] for run in runs]
  if any(s != steps[0] for s in steps):
    return {}
  out = {'step': steps[0]}
  for key in CURVE_KEYS:
    if all(key in r for run in runs for r in run['rows']):
      out[key] = _stats([[r[key] for r in run['rows']] for run in runs])
  return out


def summarise(results: dict[str, dict]) -> dict:
  """Per group of seeds: mean, std and range of the final test error and
  training loss, of every final diagnostic (per interface), and of the
  CURVE_KEYS at every evaluation ('curve')."""
  groups = {}
  for name, res in results.items():
    groups.setdefault(name.rsplit('_s', 1)[0], []).append(res)
  stats = _stats
  summary = {}
  for key, runs in sorted(groups.items()):
    entry = {'seeds': len(runs),
             'test_error': stats([r['test_error'] for r in runs]),
             'train_loss': stats([r['rows'][-1]['train_loss'] for r in runs])}
    finals = [r.get('final', {}) for r in runs]
    for k in sorted(set.intersection(*(set(f) for f in finals))):
      entry[k] = stats([f[k] for f in finals])
    entry['curve'] = curve(runs)
    summary[key] = entry
  return summary


def plot(results: dict[str, dict], path: str) -> None:
  """Per run group: test error, and sg / target / update cosines on the train
  probe over training (interfaces in shades, seeds overlaid)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [('test_error', 'test error %'),
            ('train_loss', 'train loss (since last eval)'),
            ('train_sg_cos', 'SG cos, per example'),
            ('train_sg_cos_hi', 'SG cos, top-decile loss'),
            ('train_sg_cos_pooled', 'SG cos, pooled'),
            ('train_target_cos', 'target cos, per example'),
            ('train_update_cos', 'param-update cos')]
  groups = sorted({n.rsplit('_s', 1)[0] for n in results})
  fig, axes = plt.subplots(len(groups), len(panels),
                           figsize=(3.1 * len(panels), 2.4 * len(groups)),
                           squeeze=False)
  for g, group in enumerate(groups):
    for name, res in sorted(results.items()):
      if name.rsplit('_s', 1)[0] != group:
        continue
      steps = [r['step'] for r in res['rows']]
      for p, (key, title) in enumerate(panels):
        ax = axes[g][p]
        values = [r.get(key) for r in res['rows']]
        if values and values[0] is None:
          ax.set_axis_off()
          continue
        if key in ('test_error', 'train_loss'):
          ax.plot(steps, values, color='k', alpha=0.6)
        else:
          series = np.asarray(values, np.float64)
          for i in range(series.shape[1]):
            ax.plot(steps, series[:, i], alpha=0.7,
                    color=plt.cm.viridis(i / max(1, series.shape[1] - 1)),
                    label=f'interface {i + 1}' if name.endswith('_s0') or
                    name == sorted(results)[0] else None)
          ax.axhline(0, color='grey', lw=0.5)
        ax.set_title(f'{group}\n{title}' if p == 0 else title, fontsize=7)
        ax.tick_params(labelsize=6)
  for ax in axes.flat:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=5)
      break
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _parse(flag: str, cast) -> list:
  values = getattr(FLAGS, flag)
  try:
    out = [cast(v) for v in values if v.strip()]
  except ValueError:
    raise ValueError(f'--{flag}={",".join(values)}: not a list of '
                     f'{cast.__name__}') from None
  if not out:
    raise ValueError(f'--{flag} is empty')
  return out


def main(argv):
  cli.no_positional_arguments(argv)
  with cli.one_line_errors(PROG):
    if not FLAGS.workdir:
      raise ValueError('--workdir is required')
    methods = _parse('methods', str)
    for m in methods:
      if m not in feedforward.METHODS:
        raise ValueError(f'--methods: {m!r} is not one of '
                         f'{", ".join(feedforward.METHODS)}')
    depths = _parse('num_layers', int)
    seeds = _parse('seeds', int)
    lrs = _parse('learning_rates', float)
    budgets = _parse('num_steps', int)
    decays = _parse('stale_decays', float)
    if any(d < 2 for d in depths):
      raise ValueError('--num_layers: every depth must be >= 2')
    if any(s < 0 for s in seeds):
      raise ValueError('--seeds: must be >= 0')
    if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
      raise ValueError('--learning_rates: must be positive finite numbers')
    if any(b < 1 for b in budgets):
      raise ValueError('--num_steps: must be >= 1')
    if any(not 0 <= d < 1 for d in decays):
      raise ValueError('--stale_decays: must be in [0, 1)')
    for flag in ('batch_size', 'num_evals', 'probe_size'):
      if getattr(FLAGS, flag) < 1:
        raise ValueError(f'--{flag}={getattr(FLAGS, flag)}: must be >= 1')
    if not 0 < FLAGS.top_fraction <= 1:
      raise ValueError(f'--top_fraction={FLAGS.top_fraction}: must be in '
                       '(0, 1]')
    if FLAGS.train_limit is not None and FLAGS.train_limit < 1:
      raise ValueError(f'--train_limit={FLAGS.train_limit}: must be >= 1')
    if FLAGS.cost_only:
      for depth in depths:
        for method in methods:
          config = _config(FLAGS.dataset, FLAGS.model, depth, method, lrs[0],
                           budgets[0], seeds[0], decays[0], FLAGS.lr_schedule)
          flops = step_flops(config, FLAGS.batch_size)
          totals = ', '.join(f'{b} steps: {flops * b / 1e15:.3g} PFLOP'
                             for b in budgets)
          print(f'{FLAGS.dataset} {FLAGS.model}{depth} {method}: '
                f'{flops / 1e9:.4g} GFLOP/step at batch {FLAGS.batch_size}; '
                f'{totals}')
      return
    # No --data_source flag here: errors do not suggest one.
    train = data.load_dataset(FLAGS.dataset, 'train', FLAGS.data_dir,
                              limit=FLAGS.train_limit, tfds_hint=False)
    test = data.load_dataset(FLAGS.dataset, 'test', FLAGS.data_dir,
                             tfds_hint=False)
    if 'stale' in methods and FLAGS.probe_size > FLAGS.batch_size:
      raise ValueError(f'--probe_size={FLAGS.probe_size}: the stale baseline '
                       f'holds --batch_size={FLAGS.batch_size} slots; use a '
                       'probe no larger')
    n = FLAGS.probe_size
    probes = {'train': (train.images[:n], train.labels[:n]),
              'test': (test.images[:n], test.labels[:n])}
    results = {}
    for depth in depths:
      for method in methods:
        for lr in lrs:
          for steps in budgets:
            for decay in (decays if method == 'stale' else [None]):
              for seed in seeds:
                name = run_name(FLAGS.dataset, FLAGS.model, depth, method,
                                lr, steps, seed, decay)
                config = _config(FLAGS.dataset, FLAGS.model, depth, method,
                                 lr, steps, seed, decay, FLAGS.lr_schedule)
                results[name] = train_run(
                    os.path.join(FLAGS.workdir, name), config, steps, train,
                    test, probes, FLAGS.num_evals, FLAGS.top_fraction)
    summary = summarise(results)
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
    if FLAGS.summary_json:
      training.write_json_atomic(FLAGS.summary_json,
                                 {'summary': summary, 'runs': results})
    if FLAGS.plot:
      plot(results, FLAGS.plot)


if __name__ == '__main__':
  define_flags()
  app.run(main)

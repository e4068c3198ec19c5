"""The fidelity experiments' plots (PNG, matplotlib imported when called)."""

import os

import numpy as np

from dni_jax import reporting


def plot_ff(results: dict[str, dict], path: str) -> None:
  """Per run group: test error, and sg / target / update cosines on the train
  probe over training (interfaces in shades, seeds overlaid)."""
  plt = reporting.pyplot()
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


def plot_rnn(results: list[dict], path: str) -> None:
  """`--experiment=recall`: recall loss and the core-parameter gradient
  cosine (SG vs true); `multinet`: B's test error and M's cosines."""
  plt = reporting.pyplot()
  recall = results[0]['experiment'] == 'recall'
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = {'bptt': 'C7', 'dni': 'C0', 'dni_aux': 'C3', 'backprop': 'C7',
            'dni_state': 'C3', 'decoupled': 'C1'}
  for r in results:
    steps = [row['step'] for row in r['rows']]
    label = f'{r["method"]} seed {r["seed"]}'
    if recall:
      axes[0].plot(steps, [row['bits_per_cue_bit'] for row in r['rows']],
                   color=colors[r['method']], label=label, alpha=0.8)
      if r['method'] != 'bptt':
        axes[1].plot(steps, [row['boundaries'][0]['cos_param_grad_sg_true']
                             for row in r['rows']],
                     color=colors[r['method']], label=label, alpha=0.8)
    else:
      axes[0].plot(steps, [row['b_test_error'] for row in r['rows']],
                   color=colors[r['method']], label=label, alpha=0.8)
      for name, style in (('cos_m_message_only', '-'),
                          ('cos_probe_message_state', ':'),
                          ('cos_probe_message_state_labels', '--'),
                          ('cos_m_message_state', '-')):
        if name in r['rows'][0]:
          axes[1].plot(steps, [row[name] for row in r['rows']], style,
                       color=colors[r['method']], alpha=0.8,
                       label=f'{name} seed {r["seed"]}')
  if recall:
    axes[0].set_ylabel('recall loss, bits per cue bit (chance 1)')
    axes[1].set_ylabel('cosine, core-parameter gradient: SG vs true')
    axes[0].set_xlabel('unrolls')
  else:
    axes[0].set_ylabel('B test error %')
    axes[1].set_ylabel("cosine of M with B's true message gradient")
    axes[0].set_xlabel('steps of A')
  axes[1].set_xlabel(axes[0].get_xlabel())
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_ptb(results: list[dict], path: str) -> None:
  """Validation BPC per cut, max |c| of the carried state, and the cosines
  of M(y_b) and its target with the true gradient."""
  plt = reporting.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  colors = {'bptt': 'C7', 'dni': 'C0', 'dni_aux': 'C3', 'bptt_long': 'k'}
  for r in results:
    steps = [row['step'] for row in r['rows']]
    color, first = colors[r['method']], r['seed'] == min(
        x['seed'] for x in results if x['method'] == r['method'])
    label = f'{r["method"]} T={r["config"]["unroll"]}'
    for i, rows in enumerate(r['eval_rows']):
      axes[0].plot(steps, [row[f'valid_bpc_rows{rows}'] for row in r['rows']],
                   ('-', '--', ':')[min(i, 2)], color=color, alpha=0.8,
                   label=f'{label}, {rows} stream(s)' if first else None)
    axes[1].semilogy(steps, [max(row['max_abs_c_train'], 1e-3)
                             for row in r['rows']], color=color, alpha=0.8,
                     label=label if first else None)
    if 'cos_sg_true' in r['rows'][0]:
      axes[2].plot(steps, [row['cos_sg_true'] for row in r['rows']],
                   color=color, alpha=0.8,
                   label=f'{label}: M(y_b)' if first else None)
      axes[2].plot(steps, [row['cos_target_true'] for row in r['rows']], ':',
                   color=color, alpha=0.8,
                   label=f'{label}: target' if first else None)
  axes[0].set_ylabel('validation BPC (cut into N streams)')
  axes[1].set_ylabel('max |c|, carried training state')
  axes[2].set_ylabel(f'cosine with the true gradient '
                     f'(next {results[0]["horizon"]} chars)')
  for ax in axes:
    ax.set_xlabel('training steps (unrolls)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_m_check(results: list[dict], path: str) -> None:
  """Left: the held-out core-parameter gradient cosine (M against the true
  gradient) while M trains alone, per way of training it and seed. Right:
  the lag cosines recorded during DNI training (M now against the true
  gradient `lag` unrolls earlier; dashed: the true gradient against itself)."""
  plt = reporting.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  styles = {'library_continue': '-', 'library_fresh': '--', 'oracle': ':'}
  for k, r in enumerate(results):
    color = f'C{k}'
    for name, style in styles.items():
      axes[0].plot([row['step'] for row in r[name]],
                   [row['cos_param_grad_sg_true'] for row in r[name]], style,
                   color=color, label=f'{name} seed {r["seed"]}')
    lags = sorted(r['lag'], key=int)
    axes[1].plot([int(l) for l in lags],
                 [r['lag'][l]['cos_sg_now_true_then'] for l in lags], 'o-',
                 color=color, label=f'M now vs true then, seed {r["seed"]}')
    axes[1].plot([int(l) for l in lags],
                 [r['lag'][l]['cos_true_now_true_then'] for l in lags], 'x--',
                 color=color, label=f'true now vs true then, seed {r["seed"]}')
  axes[0].set_xlabel('M-only unrolls (core and readout frozen)')
  axes[0].set_ylabel('held-out cos, core-param grad: M vs true')
  axes[1].set_xlabel('lag (unrolls), during DNI training')
  axes[1].set_ylabel('mean cosine')
  for ax in axes:
    ax.axhline(0, color='grey', lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

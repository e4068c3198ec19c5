"""Workdirs written when a recurrent or multi-network state kept one Adam state
over its dict of modules (before each module had its own) still resume, and
bit-identically: the same metrics as a run that never stopped."""

import os
import shutil

import pytest

from dni_jax import multinet_experiments
from dni_jax import rnn_experiments
from dni_jax import training

import conftest


def _to_single_adam(raw):
  """A state's per-module Adam states, as orbax restores them without a target
  ({name: [{'count', 'mu', 'nu'}, None]}), in the layout one `optax.adam` over
  the whole dict of modules has ([{'count', 'mu': {name: ...}, 'nu'}, None])."""
  names = sorted(raw['opt_state'])
  counts = {int(raw['opt_state'][n][0]['count']) for n in names}
  assert len(counts) == 1, counts
  adam = {'count': raw['opt_state'][names[0]][0]['count'],
          'mu': {n: raw['opt_state'][n][0]['mu'] for n in names},
          'nu': {n: raw['opt_state'][n][0]['nu'] for n in names}}
  return {**raw, 'opt_state': [adam, None]}


def _rewrite_in_single_adam_layout(workdir, step, state_keys):
  """Rewrites WORKDIR's checkpoint `step` as the code before wrote it."""
  checkpointer = training.Checkpointer(workdir)
  raw = checkpointer.manager.restore(step)
  old = {k: (_to_single_adam(v) if k in state_keys else v)
         for k, v in raw.items()}
  shutil.rmtree(os.path.join(workdir, training.CHECKPOINT_DIR, str(step)))
  checkpointer.manager.reload()
  checkpointer.save(step, old)
  checkpointer.close()
  assert set(training.Checkpointer(workdir).manager.restore(step)[
      state_keys[0]]['opt_state'][0]['mu']) == set(
          raw[state_keys[0]]['opt_state'])


def _check_old_layout_resumes(make_exp, train, half, state_keys):
  """Uninterrupted run to the end vs a run stopped at `half`, its checkpoint
  rewritten in the old layout, then extended to the end."""
  full = make_exp('full', None)
  train(full)
  stopped = make_exp('stopped', half)
  train(stopped)
  _rewrite_in_single_adam_layout(stopped.workdir, half, state_keys)
  train(make_exp('stopped', None))
  # It resumed from the old checkpoint (none moved aside as unreadable).
  assert not os.path.exists(os.path.join(stopped.workdir,
                                         training.UNREADABLE_DIR))
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'train_time'}
                        for r in rows]
  assert (strip(training.read_metrics(stopped.workdir))
          == strip(training.read_metrics(full.workdir)))


@pytest.mark.parametrize('num_devices', [1, 2])   # 2: streams sharded.
def test_recurrent_workdir_with_one_adam_state_resumes(tmp_path, num_devices):
  def make_exp(name, num_steps):
    return rnn_experiments.RecurrentExperiment(
        workdir=str(tmp_path / name), task='copy', method='dni_aux',
        hidden_size=8, unroll=3, learning_rate=1e-2, batch_size=4,
        num_steps=num_steps or 6, eval_every=3, log_every=1,
        checkpoint_every=3, num_devices=num_devices)
  _check_old_layout_resumes(make_exp, rnn_experiments.train_recurrent, 3,
                            ('state',))


def test_multinet_workdir_with_one_adam_state_resumes(tmp_path):
  data_dir = conftest.write_mnist_like(str(tmp_path / 'mnist'), 64, 32)

  def make_exp(name, num_steps):
    return multinet_experiments.MultinetExperiment(
        workdir=str(tmp_path / name), data_dir=data_dir, mode='dni', tick=2,
        hidden_size=8, batch_size=4, num_steps=num_steps or 16, eval_every=8,
        log_every=4, checkpoint_every=8, eval_streams=4, eval_blocks=2)
  _check_old_layout_resumes(make_exp, multinet_experiments.train_multinet, 8,
                            ('a', 'b'))

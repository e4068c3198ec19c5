"""Copy / Repeat Copy generators, the stream and the curriculum (Sec. 3.2, A.3)."""


import jax.numpy as jnp
import numpy as np
import pytest

from dni_jax import recurrent
from dni_jax import rnn_experiments
from dni_jax import rnn_task_drivers
from dni_jax import rnn_tasks


def test_copy_episode_hand_checked():
  ep = rnn_tasks.make_episodes('copy', np.random.default_rng(0), 2, n=2)
  assert ep.inputs.shape == (2, 6, 9) and ep.targets.shape == (2, 6, 9)
  bits = ep.inputs[:, :2, :8]
  # Read N vectors, the stop marker, then write them back and stop.
  np.testing.assert_array_equal(ep.inputs[:, :2, 8], 0)
  np.testing.assert_array_equal(ep.inputs[:, 2], [[0] * 8 + [1]] * 2)
  np.testing.assert_array_equal(ep.inputs[:, 3:], 0)
  np.testing.assert_array_equal(ep.targets[:, :3], 0)
  np.testing.assert_array_equal(ep.targets[:, 3:5, :8], bits)
  np.testing.assert_array_equal(ep.targets[:, 3:5, 8], 0)
  np.testing.assert_array_equal(ep.targets[:, 5], [[0] * 8 + [1]] * 2)
  np.testing.assert_array_equal(ep.mask, [[0, 0, 0, 1, 1, 1]] * 2)
  assert set(np.unique(bits)) <= {0.0, 1.0}


def test_repeat_copy_episode_hand_checked():
  ep = rnn_tasks.make_episodes('repeat_copy', np.random.default_rng(1), 1,
                               n=2, r=3)
  length = rnn_tasks.episode_length('repeat_copy', 2, 3)
  assert length == 2 + 2 + 6 + 1
  assert ep.inputs.shape == (1, length, 10)
  a, b = ep.inputs[0, 0, :8], ep.inputs[0, 1, :8]
  assert ep.inputs[0, 2, 8] == 1 and ep.inputs[0, 2, 9] == 0
  np.testing.assert_allclose(ep.inputs[0, 3], [0] * 9 + [0.3])
  np.testing.assert_array_equal(ep.inputs[0, 4:], 0)
  np.testing.assert_array_equal(ep.targets[0, 4:10, :8],
                                np.stack([a, b, a, b, a, b]))
  np.testing.assert_array_equal(ep.targets[0, 10], [0] * 8 + [1])
  np.testing.assert_array_equal(ep.mask[0], [0] * 4 + [1] * 7)


def test_curriculum_levels_and_task_lengths():
  level = rnn_tasks.first_level('copy')
  assert (level.n, level.r) == (1, 1)
  assert rnn_tasks.task_length('copy', level) == 4          # N + 3.
  level = rnn_tasks.next_level('copy', level)
  assert (level.n, level.r, level.advances) == (2, 1, 1)
  levels = [rnn_tasks.first_level('repeat_copy')]
  for _ in range(4):
    levels.append(rnn_tasks.next_level('repeat_copy', levels[-1]))
  assert [(l.n, l.r) for l in levels] == [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3)]
  assert rnn_tasks.task_length('repeat_copy', levels[-1]) == 12  # N R + 3.
  with pytest.raises(ValueError, match="unknown task 'add'"):
    rnn_tasks.first_level('add')


def test_stream_concatenates_episodes_with_resets():
  level = rnn_tasks.first_level('copy')          # Episodes of 4 steps.
  state = rnn_tasks.first_stream_state('copy')
  (inputs, targets, mask, resets), state = rnn_tasks.stream_chunk(
      'copy', 3, 2, state, level, 6)
  np.testing.assert_array_equal(resets, [[1, 0, 0, 0, 1, 0]] * 2)
  ep0 = rnn_tasks.make_episodes('copy', np.random.default_rng([3, 0]), 2, 1)
  ep1 = rnn_tasks.make_episodes('copy', np.random.default_rng([3, 1]), 2, 1)
  np.testing.assert_array_equal(inputs[:, :4], ep0.inputs)
  np.testing.assert_array_equal(targets[:, 4:], ep1.targets[:, :2])
  assert state == rnn_tasks.StreamState(episode=1, position=2, n=1, r=1)
  # A new level applies from the next episode on; the one in progress ends.
  harder = rnn_tasks.next_level('copy', level)
  (_, _, mask2, resets2), state2 = rnn_tasks.stream_chunk(
      'copy', 3, 2, state, harder, 4)
  np.testing.assert_array_equal(resets2[0], [0, 0, 1, 0])
  np.testing.assert_array_equal(mask2[0], [1, 1, 0, 0])
  assert state2 == rnn_tasks.StreamState(episode=2, position=2, n=2, r=1)
  # The stream depends only on its state: the same chunk again.
  (again, *_), _ = rnn_tasks.stream_chunk('copy', 3, 2, state, harder, 4)
  (first, *_), _ = rnn_tasks.stream_chunk('copy', 3, 2, state, harder, 4)
  np.testing.assert_array_equal(again, first)


class _FakeRecurrent:
  """evaluate_chunk returns a loss that gives `bits` bits per scored step."""

  def __init__(self, bits):
    self.bits = bits
    self.config = recurrent.RecurrentConfig(
        core='lstm', input_size=9, output_size=9, hidden_size=4, unroll=2,
        loss='bernoulli')

  def evaluate_chunk(self, params, state0, chunk):
    del params
    count = jnp.sum(chunk.mask)
    return state0, {'loss_sum': count * self.bits * np.log(2.0),
                    'count': count}


@pytest.mark.parametrize('bits,advances', [(0.149, True), (0.151, False)])
def test_curriculum_advances_at_the_threshold(tmp_path, bits, advances):
  exp = rnn_experiments.RecurrentExperiment(
      workdir=str(tmp_path), task='repeat_copy', batch_size=4, unroll=2)
  task = rnn_task_drivers.CopyTask(exp)
  row = task.evaluate(_FakeRecurrent(bits), params=None)
  assert row['bits_error'] == pytest.approx(bits, abs=1e-5)
  if advances:
    assert row['solved'] and task.level == (2, 1, 1)
    assert task.result()['max_task_length'] == 4
  else:
    assert 'solved' not in row and task.level == (1, 1, 0)
    assert task.result()['max_task_length'] == 0

"""Copy and Repeat Copy (Sec. 3.2, A.3; the tasks of Graves et al. 2014, the
paper's ref. [8]) with their curriculum. Host-side numpy, seeded.

Episode layout (all batch rows share N and R, so episodes start together):

  Copy, 2N + 2 steps, inputs 9 channels (8 data bits + stop), outputs 9
  (8 data bits + stop):
    steps 0..N-1     input: N random 8-bit vectors;
    step  N          input: the stop marker (channel 8);
    steps N+1..2N    target: the N vectors again, in order;
    step  2N+1       target: the final stop marker (channel 8).
  Repeat Copy, N + 2 + N*R + 1 steps, inputs 10 channels (+ repeat):
    steps 0..N-1     input: N random 8-bit vectors;
    step  N          input: the stop marker (channel 8);
    step  N+1        input: the repeat count, R / 10 on channel 9 (NTM
                     normalises R; the scale 1/10 is our choice);
    steps N+2..      target: the sequence R times, then the final stop marker.
Only the target steps are scored (mask 1): 8 bits and the stop channel, with a
sigmoid cross-entropy per channel. The paper counts an episode as
T_task = N + 3 (Copy) and N*R + 3 (Repeat Copy); we report T_task by that
formula (`task_length`) and document the real episode length beside it.

Curriculum (A.3): once the model averages below 0.15 bits error -- here the
cross-entropy in bits per scored step (summed over its 9 channels), averaged
over a batch of fresh episodes run from a zero state -- Copy increments N; Repeat
Copy alternates incrementing N and R, N first. Levels start at N = 1 (R = 1).
"""

import functools
from typing import NamedTuple

import numpy as np

TASKS = ('copy', 'repeat_copy')
DATA_BITS = 8
STOP_CHANNEL = 8
REPEAT_CHANNEL = 9
REPEAT_SCALE = 0.1
INPUT_SIZE = {'copy': 9, 'repeat_copy': 10}
OUTPUT_SIZE = 9
SOLVED_BITS = 0.15   # A.3's threshold.


class Episodes(NamedTuple):
  inputs: np.ndarray    # f32[B, L, input_size].
  targets: np.ndarray   # f32[B, L, 9].
  mask: np.ndarray      # f32[B, L].


class Level(NamedTuple):
  """A curriculum level: sequence length N, repeats R, levels passed so far."""
  n: int
  r: int
  advances: int


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; expected one of {", ".join(TASKS)}')


def first_level(task: str) -> Level:
  check_task(task)
  return Level(n=1, r=1, advances=0)


def next_level(task: str, level: Level) -> Level:
  """Copy: N + 1. Repeat Copy: N + 1 and R + 1 alternately (N first)."""
  check_task(task)
  if task == 'copy' or level.advances % 2 == 0:
    return Level(level.n + 1, level.r, level.advances + 1)
  return Level(level.n, level.r + 1, level.advances + 1)


def task_length(task: str, level: Level) -> int:
  """T_task as the paper counts it: N + 3 (Copy), N R + 3 (Repeat Copy)."""
  check_task(task)
  return level.n + 3 if task == 'copy' else level.n * level.r + 3


def episode_length(task: str, n: int, r: int) -> int:
  """Steps of one episode as laid out here (see the module docstring)."""
  check_task(task)
  return 2 * n + 2 if task == 'copy' else n + 2 + n * r + 1


def make_episodes(task: str, rng: np.random.Generator, batch_size: int, n: int,
                  r: int = 1) -> Episodes:
  """`batch_size` episodes of sequence length n (and r repeats)."""
  check_task(task)
  if n < 1 or r < 1:
    raise ValueError(f'need n >= 1 and r >= 1, got n={n}, r={r}')
  if task == 'copy':
    r = 1
  length = episode_length(task, n, r)
  bits = rng.integers(0, 2, size=(batch_size, n, DATA_BITS)).astype(np.float32)
  inputs = np.zeros((batch_size, length, INPUT_SIZE[task]), np.float32)
  targets = np.zeros((batch_size, length, OUTPUT_SIZE), np.float32)
  mask = np.zeros((batch_size, length), np.float32)
  inputs[:, :n, :DATA_BITS] = bits
  inputs[:, n, STOP_CHANNEL] = 1.0
  out_start = n + 1
  if task == 'repeat_copy':
    inputs[:, n + 1, REPEAT_CHANNEL] = REPEAT_SCALE * r
    out_start = n + 2
  targets[:, out_start:out_start + n * r, :DATA_BITS] = np.tile(bits, (1, r, 1))
  targets[:, out_start + n * r, STOP_CHANNEL] = 1.0
  mask[:, out_start:] = 1.0
  return Episodes(inputs, targets, mask)


class StreamState(NamedTuple):
  """Where the training stream is: the episode in progress (its index, the
  next step in it, and its N and R). Plain ints, checkpointed."""
  episode: int
  position: int
  n: int
  r: int


def first_stream_state(task: str) -> StreamState:
  level = first_level(task)
  return StreamState(episode=0, position=0, n=level.n, r=level.r)


@functools.lru_cache(maxsize=4)
def _episode(task: str, seed: int, batch_size: int, index: int, n: int,
             r: int) -> Episodes:
  return make_episodes(task, np.random.default_rng([seed, index]), batch_size,
                       n, r)


def stream_chunk(task: str, seed: int, batch_size: int, state: StreamState,
                 level: Level, length: int
                 ) -> tuple[tuple[np.ndarray, ...], StreamState]:
  """The next `length` steps of back-to-back episodes, and the new state.

  Episode k is drawn from `default_rng([seed, k])`, so the stream depends only
  on (seed, the curriculum's history). The episode in progress keeps its N and
  R; the next ones use `level`. Returns ((inputs, targets, mask, resets), state)
  with resets[:, t] = 1 where an episode starts.
  """
  pieces = []
  episode, position, n, r = state
  remaining = length
  while remaining > 0:
    ep = _episode(task, seed, batch_size, episode, n, r)
    ep_len = ep.mask.shape[1]
    take = min(remaining, ep_len - position)
    resets = np.zeros((batch_size, take), np.float32)
    if position == 0:
      resets[:, 0] = 1.0
    sl = slice(position, position + take)
    pieces.append((ep.inputs[:, sl], ep.targets[:, sl], ep.mask[:, sl], resets))
    position += take
    remaining -= take
    if position == ep_len:
      episode, position, n, r = episode + 1, 0, level.n, level.r
  chunk = tuple(np.concatenate(parts, axis=1) for parts in zip(*pieces))
  return chunk, StreamState(episode, position, n, r)


def eval_episodes(task: str, seed: int, batch_size: int, level: Level
                  ) -> Episodes:
  """Fresh episodes for the curriculum check at `level` (not in the stream)."""
  rng = np.random.default_rng([seed, 1 << 30, level.advances])
  return make_episodes(task, rng, batch_size, level.n, level.r)

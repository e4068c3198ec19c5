"""IDX file reader for MNIST and Fashion-MNIST.

The IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header, then raw uint8 data.
  images: magic 2051 (0x00000803), count, rows, cols, then count*rows*cols pixel bytes;
  labels: magic 2049 (0x00000801), count, then count label bytes.
Files may be gzipped (`.gz`) or raw.
"""

import gzip
import os
import zlib

import numpy as np

from dni_jax.data.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.


def find_idx_file(data_dir: str, stem: str) -> str | None:
  """Returns the path of `stem` (raw, preferred) or `stem.gz` in `data_dir`, or None."""
  for file_name in (stem, stem + '.gz'):
    path = os.path.join(data_dir, file_name)
    if os.path.isfile(path):
      return path
  return None


def read_file_bytes(path: str) -> bytes:
  """Reads a file, gunzipping it when its name ends in `.gz`."""
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()
    with open(path, 'rb') as f:
      return f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as err:
    raise DataError(f'{path}: corrupt gzip file ({err})') from err
  except OSError as err:
    raise DataError(f'{path}: cannot read file ({err})') from err


def _parse_header(data: bytes, path: str, magic: int, num_dims: int, kind: str) -> tuple[int, ...]:
  """Checks magic and total size; returns the dimensions (count first)."""
  header_size = 4 * (1 + num_dims)
  if len(data) < header_size:
    raise DataError(
        f'{path}: truncated IDX {kind} file: {len(data)} bytes, shorter than the {header_size}-byte header')
  header = np.frombuffer(data, dtype='>u4', count=1 + num_dims)
  if int(header[0]) != magic:
    raise DataError(
        f'{path}: bad magic number 0x{int(header[0]):08x} for an IDX {kind} file '
        f'(expected 0x{magic:08x} = {magic})')
  dims = tuple(int(d) for d in header[1:])
  expected_size = header_size + int(np.prod(dims, dtype=np.int64))
  if len(data) < expected_size:
    raise DataError(
        f'{path}: truncated IDX {kind} file: {len(data)} bytes, header {dims} needs {expected_size}')
  if len(data) > expected_size:
    raise DataError(
        f'{path}: {len(data) - expected_size} trailing extra bytes after the IDX {kind} data '
        f'(header {dims} needs {expected_size} bytes, file has {len(data)})')
  return dims


def parse_idx_images(data: bytes, path: str) -> np.ndarray:
  """Parses IDX image bytes into uint8 [N, rows, cols]; `path` is for messages."""
  dims = _parse_header(data, path, IMAGES_MAGIC, num_dims=3, kind='images')
  return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(dims)


def parse_idx_labels(data: bytes, path: str, num_classes: int) -> np.ndarray:
  """Parses IDX label bytes into uint8 [N], each in [0, num_classes)."""
  dims = _parse_header(data, path, LABELS_MAGIC, num_dims=1, kind='labels')
  labels = np.frombuffer(data, dtype=np.uint8, offset=8).reshape(dims)
  if labels.size and int(labels.max()) >= num_classes:
    bad_index = int(np.argmax(labels >= num_classes))
    raise DataError(
        f'{path}: label {int(labels[bad_index])} at index {bad_index} is out of range '
        f'[0, {num_classes})')
  return labels


def read_idx_pair(images_path: str, labels_path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads an IDX images/labels pair: (uint8 [N, rows, cols], uint8 [N])."""
  images_NxHxW = parse_idx_images(read_file_bytes(images_path), images_path)
  labels_N = parse_idx_labels(read_file_bytes(labels_path), labels_path, num_classes)
  if images_NxHxW.shape[0] != labels_N.shape[0]:
    raise DataError(
        f'{images_path}: image count {images_NxHxW.shape[0]} does not match the label count '
        f'{labels_N.shape[0]} in {labels_path}')
  return images_NxHxW, labels_N

"""CIFAR-10 reader for the official *binary* version (`cifar-10-binary.tar.gz`).

Layout (https://www.cs.toronto.edu/~kriz/cifar.html): `cifar-10-batches-bin/data_batch_{1..5}.bin` and
`test_batch.bin`, each a sequence of 3073-byte records: 1 label byte, then 3072 pixel bytes as
3 channel planes (R, G, B) of 32x32 in row-major order. The python (pickled) version is never read.
"""

import os

import numpy as np

from dni_jax.data.errors import DataError

BATCHES_DIR = 'cifar-10-batches-bin'
TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
TEST_FILES = ('test_batch.bin',)
IMAGE_SHAPE_CHW = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32  # 3073


def batches_dir(data_dir: str) -> str:
  """Accepts the folder holding `cifar-10-batches-bin/` or that folder itself."""
  nested = os.path.join(data_dir, BATCHES_DIR)
  return nested if os.path.isdir(nested) else data_dir


def read_cifar_batch(path: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Reads one binary batch file: (uint8 [N, 32, 32, 3], uint8 [N])."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: missing CIFAR-10 binary batch file')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as err:
    raise DataError(f'{path}: cannot read file ({err})') from err
  if not data:
    raise DataError(f'{path}: empty CIFAR-10 batch file')
  if len(data) % RECORD_BYTES:
    raise DataError(
        f'{path}: truncated or corrupt CIFAR-10 batch file: {len(data)} bytes is not a multiple of '
        f'the {RECORD_BYTES}-byte record')
  records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
  labels_N = records[:, 0]
  if int(labels_N.max()) >= num_classes:
    bad_index = int(np.argmax(labels_N >= num_classes))
    raise DataError(
        f'{path}: label {int(labels_N[bad_index])} at record {bad_index} is out of range '
        f'[0, {num_classes})')
  images_NxHxWxC = records[:, 1:].reshape(-1, *IMAGE_SHAPE_CHW).transpose(0, 2, 3, 1)
  return images_NxHxWxC, labels_N


def read_cifar_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the 'train' (5 batches, 50000) or 'test' (10000) split: (uint8 [N,32,32,3], uint8 [N])."""
  folder = batches_dir(data_dir)
  file_names = TRAIN_FILES if split == 'train' else TEST_FILES
  batches = [read_cifar_batch(os.path.join(folder, name)) for name in file_names]
  images = np.concatenate([images for images, _ in batches])
  labels = np.concatenate([labels for _, labels in batches])
  return images, labels

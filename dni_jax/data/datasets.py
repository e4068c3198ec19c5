"""`load_dataset`: MNIST, Fashion-MNIST and CIFAR-10 as float32 images in [0, 1] and int32 labels.

Two sources: 'files' reads the official file formats from a folder (IDX for MNIST and Fashion-MNIST,
the binary version for CIFAR-10); 'tfds' reads through `tfds.data_source` (no TensorFlow needed).
"""

import os
from typing import NamedTuple

import numpy as np

from dni_jax.data import cifar
from dni_jax.data import idx
from dni_jax.data import tfds_source
from dni_jax.data.errors import DataError  # Re-exported: its old home.


class Dataset(NamedTuple):
  """A whole split in host memory."""
  images: np.ndarray  # float32 [N, H, W, C], in [0, 1].
  labels: np.ndarray  # int32 [N], in [0, num_classes).
  num_classes: int


DATASETS = ('mnist', 'fashion_mnist', 'cifar10')
SPLITS = ('train', 'test')
SOURCES = ('files', 'tfds')
# Where the Debian package `dataset-fashion-mnist` puts the IDX files. Read at call time, so a test
# can monkeypatch this module attribute.
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'

_NUM_CLASSES = {'mnist': 10, 'fashion_mnist': 10, 'cifar10': 10}
_IMAGE_SHAPE_HW = {'mnist': (28, 28), 'fashion_mnist': (28, 28), 'cifar10': (32, 32)}
_TFDS_NAMES = {'mnist': 'mnist', 'fashion_mnist': 'fashion_mnist', 'cifar10': 'cifar10'}
_IDX_STEMS = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_HOW_TO_GET = {
    'mnist': ('get the official MNIST IDX files (e.g. from '
              'https://storage.googleapis.com/cvdf-datasets/mnist/) into --data_dir'),
    'fashion_mnist': ('install them with `apt-get install dataset-fashion-mnist` (into '
                      f'{FASHION_MNIST_DEBIAN_DIR}) or pass --data_dir with the official IDX '
                      'files'),
    'cifar10': ('download and extract the binary version, cifar-10-binary.tar.gz, from '
                'https://www.cs.toronto.edu/~kriz/cifar.html and pass its folder as --data_dir'),
}
# Added to the hints above where the caller has a --data_source flag.
_TFDS_HINT = ', or use --data_source=tfds'


def _how_to_get(name: str, tfds_hint: bool) -> str:
  return _HOW_TO_GET[name] + (_TFDS_HINT if tfds_hint else '')


def _check_choice(kind: str, value: object, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise DataError(f'unknown {kind} {value!r}; expected one of {", ".join(allowed)}')


def _idx_paths(name: str, split: str, data_dir: str) -> tuple[str, str]:
  """Finds the images and labels files of `split`, gzipped or raw."""
  paths = []
  for stem in _IDX_STEMS[split]:
    path = idx.find_idx_file(data_dir, stem)
    if path is None:
      looked_for = ' or '.join(os.path.join(data_dir, f) for f in (stem + '.gz', stem))
      raise DataError(f'missing {name} file: looked for {looked_for}')
    paths.append(path)
  return paths[0], paths[1]


def _read_files(name: str, split: str, data_dir: str | None,
                tfds_hint: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads uint8 images [N, H, W, C] and labels [N] from the official file formats."""
  if data_dir is None:
    if name != 'fashion_mnist':
      raise DataError(
          f'{name} from files needs a folder: pass --data_dir '
          f'({_how_to_get(name, tfds_hint)})')
    data_dir = FASHION_MNIST_DEBIAN_DIR
  data_dir = os.path.abspath(data_dir)  # Messages name files by their full path.
  try:
    if name == 'cifar10':
      return cifar.read_cifar_split(data_dir, split)
    images_path, labels_path = _idx_paths(name, split, data_dir)
    images_NxHxW, labels_N = idx.read_idx_pair(images_path, labels_path, _NUM_CLASSES[name])
  except DataError as err:  # The readers say what is wrong; add how to get good data.
    raise DataError(f'{err}; {_how_to_get(name, tfds_hint)}') from err
  if images_NxHxW.shape[1:] != _IMAGE_SHAPE_HW[name]:
    raise DataError(
        f'{images_path}: images are {images_NxHxW.shape[1]}x{images_NxHxW.shape[2]}, expected '
        f'{name} images of {_IMAGE_SHAPE_HW[name][0]}x{_IMAGE_SHAPE_HW[name][1]}; '
        f'{_how_to_get(name, tfds_hint)}')
  return images_NxHxW[..., None], labels_N


def load_dataset(name: str,
                 split: str,
                 data_dir: str | None = None,
                 source: str = 'files',
                 limit: int | None = None,
                 tfds_hint: bool = True) -> Dataset:
  """Loads one split of a dataset into host memory.

  Args:
    name: one of DATASETS.
    split: 'train' or 'test'.
    data_dir: for source='files', the folder with the official files (for cifar10, the folder that
      holds `cifar-10-batches-bin/` or that folder itself; for fashion_mnist, defaults to
      FASHION_MNIST_DEBIAN_DIR); for source='tfds', the TFDS data folder (None: TFDS's default).
    source: 'files' or 'tfds'.
    limit: keep only the first `limit` examples (for quick runs); None keeps all.
    tfds_hint: whether error messages suggest --data_source=tfds (False for a caller without
      that flag).

  Returns:
    Dataset with images float32 [N, H, W, C] = uint8 / 255 and labels int32 [N].

  Raises:
    DataError: bad arguments, missing or corrupt files, or TFDS data not found nor downloadable.
  """
  _check_choice('dataset', name, DATASETS)
  _check_choice('split', split, SPLITS)
  _check_choice('data source', source, SOURCES)
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
    raise DataError(f'limit must be a positive integer or None, got {limit!r}')
  if source == 'files':
    images_uint8, labels = _read_files(name, split, data_dir, tfds_hint)
  else:
    images_uint8, labels = tfds_source.read_tfds(_TFDS_NAMES[name], split, data_dir, limit)
  if limit is not None:
    images_uint8, labels = images_uint8[:limit], labels[:limit]
  return Dataset(
      images=images_uint8.astype(np.float32) / np.float32(255),
      labels=labels.astype(np.int32),
      num_classes=_NUM_CLASSES[name])

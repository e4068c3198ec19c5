"""Tests for dni_jax.data: IDX and CIFAR-10 binary readers, load_dataset, and the TFDS path."""

import gzip
import os
import struct
import sys

import numpy as np
import pytest

from dni_jax import data
from dni_jax.data import datasets
from dni_jax.data import DataError
from dni_jax.data import load_dataset

IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def idx_images_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
  count, rows, cols = images.shape
  return struct.pack('>IIII', magic, count, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = 2049) -> bytes:
  return struct.pack('>II', magic, len(labels)) + labels.astype(np.uint8).tobytes()


def write_file(path, payload: bytes, gz: bool) -> str:
  path = str(path) + ('.gz' if gz else '')
  with (gzip.open(path, 'wb') if gz else open(path, 'wb')) as f:
    f.write(payload)
  return path


def make_idx_split(folder, split: str, count: int, gz: bool, seed: int = 0):
  """Writes a random IDX split of 28x28 images; returns (uint8 images, uint8 labels, paths)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
  images[0, 0, 0], images[0, 0, 1] = 0, 255  # The ends of the pixel range.
  labels = rng.integers(0, 10, size=count, dtype=np.uint8)
  images_name, labels_name = IDX_FILES[split]
  images_path = write_file(os.path.join(folder, images_name), idx_images_bytes(images), gz)
  labels_path = write_file(os.path.join(folder, labels_name), idx_labels_bytes(labels), gz)
  return images, labels, (images_path, labels_path)


def cifar_bytes(images_NxHxWxC: np.ndarray, labels: np.ndarray) -> bytes:
  """Official CIFAR-10 binary records: label byte, then R, G and B planes."""
  planes = images_NxHxWxC.transpose(0, 3, 1, 2).reshape(len(labels), -1)
  return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


def make_cifar(folder, counts=(2, 1, 1, 1, 3), test_count: int = 2, seed: int = 0):
  """Writes cifar-10-batches-bin/ under `folder`; returns {'train': (x, y), 'test': (x, y)}."""
  rng = np.random.default_rng(seed)
  batches_dir = os.path.join(folder, 'cifar-10-batches-bin')
  os.makedirs(batches_dir)
  written = {}
  files = [(f'data_batch_{i + 1}.bin', n, 'train') for i, n in enumerate(counts)]
  files.append(('test_batch.bin', test_count, 'test'))
  for file_name, count, split in files:
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    with open(os.path.join(batches_dir, file_name), 'wb') as f:
      f.write(cifar_bytes(images, labels))
    written.setdefault(split, []).append((images, labels))
  return {split: (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
          for split, parts in written.items()}


def assert_matches(dataset: data.Dataset, images_uint8: np.ndarray, labels: np.ndarray):
  assert dataset.images.dtype == np.float32
  assert dataset.labels.dtype == np.int32
  assert dataset.num_classes == 10
  np.testing.assert_array_equal(dataset.images, images_uint8.astype(np.float32) / np.float32(255))
  np.testing.assert_array_equal(dataset.labels, labels.astype(np.int32))
  assert dataset.images.min() >= 0 and dataset.images.max() <= 1


# --- IDX: MNIST / Fashion-MNIST ----------------------------------------------------------------


@pytest.mark.parametrize('gz', [True, False])
@pytest.mark.parametrize('split', ['train', 'test'])
def test_idx_round_trip(tmp_path, gz, split):
  images, labels, _ = make_idx_split(tmp_path, split, count=5, gz=gz)
  dataset = load_dataset('mnist', split, data_dir=str(tmp_path))
  assert dataset.images.shape == (5, 28, 28, 1)
  assert dataset.labels.shape == (5,)
  assert_matches(dataset, images[..., None], labels)
  assert dataset.images[0, 0, 0, 0] == 0 and dataset.images[0, 0, 1, 0] == 1


def test_idx_mixed_gzip_and_raw(tmp_path):
  # Images gzipped, labels raw: each file is found in whichever form exists.
  images, labels, _ = make_idx_split(tmp_path, 'test', count=3, gz=True)
  os.remove(tmp_path / (IDX_FILES['test'][1] + '.gz'))
  write_file(tmp_path / IDX_FILES['test'][1], idx_labels_bytes(labels), gz=False)
  assert_matches(load_dataset('mnist', 'test', data_dir=str(tmp_path)), images[..., None], labels)


def test_idx_raw_preferred_over_gzip(tmp_path):
  make_idx_split(tmp_path, 'test', count=2, gz=True, seed=1)
  images, labels, _ = make_idx_split(tmp_path, 'test', count=3, gz=False, seed=2)
  assert_matches(load_dataset('mnist', 'test', data_dir=str(tmp_path)), images[..., None], labels)


def test_limit_keeps_first_examples(tmp_path):
  images, labels, _ = make_idx_split(tmp_path, 'train', count=6, gz=True)
  dataset = load_dataset('mnist', 'train', data_dir=str(tmp_path), limit=4)
  assert dataset.images.shape == (4, 28, 28, 1)
  assert_matches(dataset, images[:4, ..., None], labels[:4])
  assert load_dataset('mnist', 'train', data_dir=str(tmp_path), limit=100).labels.shape == (6,)


def test_fashion_mnist_defaults_to_debian_dir(tmp_path, monkeypatch):
  images, labels, _ = make_idx_split(tmp_path, 'test', count=3, gz=True)
  monkeypatch.setattr(datasets, 'FASHION_MNIST_DEBIAN_DIR', str(tmp_path))
  assert_matches(load_dataset('fashion_mnist', 'test'), images[..., None], labels)


def test_fashion_mnist_missing_default_dir_says_apt_get(tmp_path, monkeypatch):
  missing = tmp_path / 'nowhere'
  monkeypatch.setattr(datasets, 'FASHION_MNIST_DEBIAN_DIR', str(missing))
  with pytest.raises(DataError) as info:
    load_dataset('fashion_mnist', 'train')
  message = str(info.value)
  assert str(missing / 'train-images-idx3-ubyte.gz') in message
  assert str(missing / 'train-images-idx3-ubyte') in message
  assert 'apt-get install dataset-fashion-mnist' in message
  assert '\n' not in message


@pytest.mark.parametrize('name', ['mnist', 'cifar10'])
def test_files_without_data_dir(name):
  with pytest.raises(DataError, match='--data_dir.*--data_source=tfds'):
    load_dataset(name, 'test')


def test_missing_idx_file_names_files_and_remedy(tmp_path):
  with pytest.raises(DataError) as info:
    load_dataset('mnist', 'test', data_dir=str(tmp_path))
  message = str(info.value)
  assert str(tmp_path / 't10k-images-idx3-ubyte.gz') in message
  assert str(tmp_path / 't10k-images-idx3-ubyte') in message
  assert 'missing' in message and '--data_source=tfds' in message


def test_missing_labels_file(tmp_path):
  _, _, (_, labels_path) = make_idx_split(tmp_path, 'test', count=2, gz=False)
  os.remove(labels_path)
  with pytest.raises(DataError, match=f'missing.*{labels_path}'):
    load_dataset('mnist', 'test', data_dir=str(tmp_path))


def _load_mnist_error(tmp_path) -> str:
  with pytest.raises(DataError) as info:
    load_dataset('mnist', 'test', data_dir=str(tmp_path))
  message = str(info.value)
  assert '\n' not in message and 'IDX files' in message  # One line, says how to get good data.
  return message


@pytest.mark.parametrize('gz', [True, False])
def test_bad_image_magic(tmp_path, gz):
  images, labels, (images_path, _) = make_idx_split(tmp_path, 'test', count=2, gz=gz)
  write_file(images_path.removesuffix('.gz'), idx_images_bytes(images, magic=2049), gz)
  message = _load_mnist_error(tmp_path)
  assert images_path in message and 'bad magic number 0x00000801' in message
  assert '0x00000803' in message


def test_bad_label_magic(tmp_path):
  _, labels, (_, labels_path) = make_idx_split(tmp_path, 'test', count=2, gz=True)
  write_file(labels_path[:-3], idx_labels_bytes(labels, magic=2051), gz=True)
  message = _load_mnist_error(tmp_path)
  assert labels_path in message and 'bad magic number 0x00000803' in message


@pytest.mark.parametrize('cut', ['header', 'one_byte', 'one_image'])
def test_truncated_images(tmp_path, cut):
  images, _, (images_path, _) = make_idx_split(tmp_path, 'test', count=2, gz=True)
  payload = idx_images_bytes(images)
  payload = {'header': payload[:10], 'one_byte': payload[:-1], 'one_image': payload[:-784]}[cut]
  write_file(images_path[:-3], payload, gz=True)
  message = _load_mnist_error(tmp_path)
  assert images_path in message and 'truncated' in message


def test_truncated_labels(tmp_path):
  _, labels, (_, labels_path) = make_idx_split(tmp_path, 'test', count=3, gz=False)
  write_file(labels_path, idx_labels_bytes(labels)[:-1], gz=False)
  message = _load_mnist_error(tmp_path)
  assert labels_path in message and 'truncated' in message


def test_trailing_bytes(tmp_path):
  images, _, (images_path, _) = make_idx_split(tmp_path, 'test', count=2, gz=False)
  write_file(images_path, idx_images_bytes(images) + b'xyz', gz=False)
  message = _load_mnist_error(tmp_path)
  assert images_path in message and '3 trailing extra bytes' in message


def test_count_mismatch(tmp_path):
  _, labels, (images_path, labels_path) = make_idx_split(tmp_path, 'test', count=3, gz=True)
  write_file(labels_path[:-3], idx_labels_bytes(labels[:2]), gz=True)
  message = _load_mnist_error(tmp_path)
  assert images_path in message and labels_path in message
  assert 'image count 3' in message and 'label count 2' in message


def test_label_out_of_range(tmp_path):
  _, labels, (_, labels_path) = make_idx_split(tmp_path, 'test', count=3, gz=True)
  labels[1] = 10
  write_file(labels_path[:-3], idx_labels_bytes(labels), gz=True)
  message = _load_mnist_error(tmp_path)
  assert labels_path in message and 'label 10 at index 1 is out of range' in message


@pytest.mark.parametrize('corruption', ['not_gzip', 'cut_stream', 'bad_crc'])
def test_corrupt_gzip(tmp_path, corruption):
  images, _, (images_path, _) = make_idx_split(tmp_path, 'test', count=2, gz=True)
  compressed = gzip.compress(idx_images_bytes(images))
  payload = {
      'not_gzip': idx_images_bytes(images),
      'cut_stream': compressed[:len(compressed) // 2],
      'bad_crc': compressed[:-8] + bytes(8),  # Zeroed CRC32 and size trailer.
  }[corruption]
  with open(images_path, 'wb') as f:
    f.write(payload)
  message = _load_mnist_error(tmp_path)
  assert images_path in message and 'corrupt gzip' in message


def test_wrong_image_size(tmp_path):
  images_path = write_file(tmp_path / IDX_FILES['test'][0],
                           idx_images_bytes(np.zeros((2, 4, 5), np.uint8)), gz=False)
  write_file(tmp_path / IDX_FILES['test'][1], idx_labels_bytes(np.zeros(2, np.uint8)), gz=False)
  message = _load_mnist_error(tmp_path)
  assert images_path in message and 'images are 4x5' in message and '28x28' in message


# --- CIFAR-10 binary -------------------------------------------------------------------------


@pytest.mark.parametrize('point_at_batches_dir', [False, True])
def test_cifar_round_trip(tmp_path, point_at_batches_dir):
  expected = make_cifar(tmp_path)
  data_dir = tmp_path / 'cifar-10-batches-bin' if point_at_batches_dir else tmp_path
  for split, count in (('train', 8), ('test', 2)):
    dataset = load_dataset('cifar10', split, data_dir=str(data_dir))
    assert dataset.images.shape == (count, 32, 32, 3)
    assert_matches(dataset, *expected[split])


def test_cifar_channel_order(tmp_path):
  # One image whose red plane is 1, green 2, blue 3: HWC pixels must read (1, 2, 3).
  batches_dir = tmp_path / 'cifar-10-batches-bin'
  batches_dir.mkdir()
  record = bytes([7]) + bytes([1] * 1024 + [2] * 1024 + [3] * 1024)
  (batches_dir / 'test_batch.bin').write_bytes(record)
  dataset = load_dataset('cifar10', 'test', data_dir=str(tmp_path))
  np.testing.assert_array_equal(dataset.images[0, 5, 9] * 255, [1, 2, 3])
  np.testing.assert_array_equal(dataset.labels, [7])


def test_cifar_limit(tmp_path):
  expected = make_cifar(tmp_path)
  dataset = load_dataset('cifar10', 'train', data_dir=str(tmp_path), limit=3)
  assert_matches(dataset, expected['train'][0][:3], expected['train'][1][:3])


def _load_cifar_error(data_dir, split='train') -> str:
  with pytest.raises(DataError) as info:
    load_dataset('cifar10', split, data_dir=str(data_dir))
  message = str(info.value)
  assert '\n' not in message and 'cifar-10-binary.tar.gz' in message
  return message


def test_cifar_missing_batch(tmp_path):
  make_cifar(tmp_path)
  path = tmp_path / 'cifar-10-batches-bin' / 'data_batch_4.bin'
  path.unlink()
  message = _load_cifar_error(tmp_path)
  assert str(path) in message and 'missing' in message


def test_cifar_missing_folder(tmp_path):
  message = _load_cifar_error(tmp_path, split='test')
  assert str(tmp_path / 'test_batch.bin') in message and 'missing' in message


def test_cifar_truncated(tmp_path):
  make_cifar(tmp_path)
  path = tmp_path / 'cifar-10-batches-bin' / 'test_batch.bin'
  path.write_bytes(path.read_bytes()[:-100])
  message = _load_cifar_error(tmp_path, split='test')
  assert str(path) in message and 'truncated' in message and '3073' in message


def test_cifar_label_out_of_range(tmp_path):
  make_cifar(tmp_path)
  path = tmp_path / 'cifar-10-batches-bin' / 'data_batch_2.bin'
  path.write_bytes(bytes([11]) + path.read_bytes()[1:])
  message = _load_cifar_error(tmp_path)
  assert str(path) in message and 'label 11 at record 0 is out of range' in message


# --- Arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs, bad, allowed', [
    (dict(name='imagenet', split='train'), "'imagenet'", 'mnist, fashion_mnist, cifar10'),
    (dict(name='mnist', split='valid'), "'valid'", 'train, test'),
    (dict(name='mnist', split='train', source='gcs'), "'gcs'", 'files, tfds'),
])
def test_unknown_arguments(kwargs, bad, allowed):
  with pytest.raises(DataError) as info:
    load_dataset(**kwargs)
  assert bad in str(info.value) and allowed in str(info.value)


@pytest.mark.parametrize('limit', [0, -1, 2.5])
def test_bad_limit(tmp_path, limit):
  with pytest.raises(DataError, match='limit'):
    load_dataset('mnist', 'test', data_dir=str(tmp_path), limit=limit)


def test_public_names():
  assert data.DATASETS == ('mnist', 'fashion_mnist', 'cifar10')
  assert data.FASHION_MNIST_DEBIAN_DIR == '/usr/share/datasets/fashion-mnist'
  assert issubclass(DataError, ValueError)
  assert data.Dataset._fields == ('images', 'labels', 'num_classes')


# --- TFDS (mocked: no network, no TensorFlow) --------------------------------------------------


@pytest.mark.parametrize('name, shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_tfds_mock(name, shape):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=7):
    dataset = load_dataset(name, 'test', source='tfds')
    limited = load_dataset(name, 'train', source='tfds', limit=3)
  assert dataset.images.shape == (7, *shape) and dataset.images.dtype == np.float32
  assert dataset.labels.shape == (7,) and dataset.labels.dtype == np.int32
  assert dataset.images.min() >= 0 and dataset.images.max() <= 1
  assert dataset.images.max() > 0  # Random mock pixels, not all zero.
  assert np.all((dataset.labels >= 0) & (dataset.labels < 10)) and dataset.num_classes == 10
  np.testing.assert_array_equal(dataset.images * 255, np.round(dataset.images * 255))
  assert limited.images.shape == (3, *shape) and limited.labels.shape == (3,)


def test_tfds_failure_becomes_data_error(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  calls = []

  def offline_data_source(name, *, split=None, data_dir=None, download=False):
    calls.append((name, split, data_dir, download))
    raise ConnectionError('Failed to resolve\n storage.googleapis.com')

  monkeypatch.setattr(tfds, 'data_source', offline_data_source)
  # The download host answers (tfds_source's probe), the download fails.
  from dni_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds_source, 'can_reach', lambda host, port: True)
  with pytest.raises(DataError) as info:
    load_dataset('fashion_mnist', 'train', data_dir=str(tmp_path), source='tfds')
  message = str(info.value)
  assert str(tmp_path) in message and 'could not find or download' in message
  assert "'fashion_mnist'" in message and 'ConnectionError' in message
  assert '--data_source=files' in message and '\n' not in message
  # Prepared data first, then asks tfds to download.
  assert calls == [('fashion_mnist', 'train', str(tmp_path), False),
                   ('fashion_mnist', 'train', str(tmp_path), True)]


def test_tfds_without_download_argument(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  calls = []

  def old_data_source(name, *, split=None, data_dir=None):
    calls.append((name, split, data_dir))
    return [{'image': np.full((32, 32, 3), 51, np.uint8), 'label': 4}] * 2

  monkeypatch.setattr(tfds, 'data_source', old_data_source)
  dataset = load_dataset('cifar10', 'test', source='tfds')
  assert calls == [('cifar10', 'test', None)]
  np.testing.assert_array_equal(dataset.images, np.full((2, 32, 32, 3), 0.2, np.float32))
  np.testing.assert_array_equal(dataset.labels, [4, 4])


def test_tfds_reads_in_batches(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  from dni_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  batches = []

  class BatchedSource:  # Like tfds's ArrayRecordDataSource: len, [i] and __getitems__.

    def __len__(self):
      return 5

    def __getitem__(self, i):
      raise AssertionError('read one by one')

    def __getitems__(self, keys):
      batches.append(list(keys))
      return [{'image': np.full((28, 28, 1), k, np.uint8), 'label': np.int64(k)} for k in keys]

  monkeypatch.setattr(tfds, 'data_source', lambda name, **kwargs: BatchedSource())
  monkeypatch.setattr(tfds_source, '_CHUNK', 2)
  dataset = load_dataset('mnist', 'train', source='tfds', limit=4)
  assert batches == [[0, 1], [2, 3]]
  np.testing.assert_array_equal(dataset.labels, [0, 1, 2, 3])
  np.testing.assert_array_equal(dataset.images[:, 3, 4, 0] * 255, [0, 1, 2, 3])


def test_tfds_not_installed(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # Makes the import fail.
  with pytest.raises(DataError, match='needs tensorflow-datasets.*--data_source=files'):
    load_dataset('mnist', 'test', source='tfds')

"""Reads a TFDS dataset split into numpy arrays through `tfds.data_source`, without TensorFlow.

`tfds.data_source` gives random access to prepared (ArrayRecord) data as numpy dicts
`{'image': uint8 [H, W, C], 'label': int}`; `tfds.load` would import TensorFlow, so it is not used.
tensorflow_datasets is imported only when this path is taken (tfds 4.9.x also needs
`importlib_resources` at run time, which it does not declare).
"""

import inspect
import os
import socket
from typing import Any, Sequence

import numpy as np

from dni_jax.data.errors import DataError

_CHUNK = 1024  # Records fetched per batched read.
# Where tfds downloads each dataset from (host, port): probed once before a
# download, so that an offline machine fails at once instead of retrying.
DOWNLOAD_HOSTS = {
    'mnist': ('storage.googleapis.com', 443),
    'fashion_mnist': ('fashion-mnist.s3-website.eu-central-1.amazonaws.com', 80),
    'cifar10': ('www.cs.toronto.edu', 443),
}
_PROBE_TIMEOUT_S = 5.0


def can_reach(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to host:port opens within `timeout` seconds."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _default_data_dir(tfds: Any) -> str:
  """TFDS's own default data folder, for messages."""
  return os.path.expanduser(
      os.environ.get('TFDS_DATA_DIR', getattr(tfds.core.constants, 'DATA_DIR', '~/tensorflow_datasets')))


def _read_records(source: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
  """Reads the first `count` records, in batches where the source supports `__getitems__`."""
  getitems = getattr(source, '__getitems__', None)
  records = []
  if getitems is not None:
    try:
      for start in range(0, count, _CHUNK):
        records.extend(getitems(list(range(start, min(start + _CHUNK, count)))))
      return records
    except TypeError:
      # tfds 4.9.10's `testing.mock_data` patches `__getitems__` without binding it: read one by one.
      records = []
  return [source[i] for i in range(count)]


def read_tfds(name: str, split: str, data_dir: str | None,
              limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads the first `limit` (default: all) examples: (uint8 [N, H, W, C], int64 [N]).

  Downloads and prepares the data under `data_dir` on first use where tfds can (needs a network).
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise DataError(
        f'--data_source=tfds needs tensorflow-datasets ({err}): '
        'pip install tensorflow-datasets importlib_resources, or use --data_source=files') from err
  where = os.path.abspath(data_dir) if data_dir is not None else _default_data_dir(tfds)
  kwargs: dict[str, Any] = {'split': split, 'data_dir': data_dir}
  source = None
  if 'download' in inspect.signature(tfds.data_source).parameters:
    # Prepared data first (no network); only then the download, once the host answers.
    try:
      source = tfds.data_source(name, download=False, **kwargs)
    except Exception:  # pylint: disable=broad-except
      source = None  # Not prepared there; a download follows.
    if source is None:
      host, port = DOWNLOAD_HOSTS.get(name, (None, None))
      if host is not None and not can_reach(host, port):
        raise DataError(
            f'{where}: no prepared tfds dataset {name!r} there, and {host} (where tfds downloads '
            'it) cannot be reached: run once with network access to download it, or use '
            '--data_source=files with --data_dir')
      kwargs['download'] = True
  if source is None:
    try:
      source = tfds.data_source(name, **kwargs)
    except Exception as err:  # pylint: disable=broad-except
      # Missing data surfaces as network, file-format or import errors, depending on the machine.
      reason = ' '.join(f'{type(err).__name__}: {err}'.split())[:300]
      raise DataError(
          f'{where}: could not find or download tfds dataset {name!r} split {split!r} '
          f'({reason}); use --data_source=files with --data_dir') from err
  count = len(source) if limit is None else min(limit, len(source))
  records = _read_records(source, count)
  if not records:
    raise DataError(f'{where}: tfds dataset {name!r} split {split!r} is empty')
  images = np.stack([np.asarray(record['image'], dtype=np.uint8) for record in records])
  labels = np.asarray([record['label'] for record in records], dtype=np.int64)
  return images, labels

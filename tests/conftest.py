"""Shared test setup: strict numerics, fake devices, tiny generated datasets."""

import contextlib
import gzip
import importlib.util
import os
import struct

from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np
import pytest

# Fail loudly on silent broadcasting; several fake CPU devices for sharding tests.
jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_num_cpu_devices', 4)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path: str, array: np.ndarray, gz: bool = True) -> None:
  """Writes uint8 `array` in the IDX format (magic 0x0803 images, 0x0801 labels)."""
  array = np.asarray(array, np.uint8)
  header = struct.pack('>HBB', 0, 0x08, array.ndim)
  header += b''.join(struct.pack('>I', d) for d in array.shape)
  opener = gzip.open if gz else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


def make_separable_digits(num: int, seed: int, size: int = 28):
  """A learnable stand-in for MNIST: class k lights up its own band of rows."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=num).astype(np.uint8)
  images = rng.integers(0, 60, size=(num, size, size)).astype(np.uint8)
  band = size // 10
  for i, k in enumerate(labels):
    images[i, k * band:(k + 1) * band, :] = 255
  return images, labels


def write_mnist_like(directory: str, num_train: int = 512, num_test: int = 128,
                     gz: bool = True) -> str:
  os.makedirs(directory, exist_ok=True)
  ext = '.gz' if gz else ''
  for prefix, num, seed in (('train', num_train, 0), ('t10k', num_test, 1)):
    images, labels = make_separable_digits(num, seed)
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte{ext}'),
              images, gz)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte{ext}'),
              labels, gz)
  return directory


@pytest.fixture
def mnist_dir(tmp_path):
  """A tiny, learnable MNIST-format dataset in IDX files."""
  return write_mnist_like(str(tmp_path / 'mnist'))


def copy_tree(tree):
  """Jitted updates may donate their states: keep the originals usable."""
  return jax.tree.map(jax.numpy.copy, tree)


def assert_tree_close(actual, expected):
  """rtol 1e-5 per element; atol 1e-6 of the leaf's largest magnitude (Adam's
  second moments are squares of small gradients)."""
  paths = jax.tree_util.tree_leaves_with_path(expected)
  for (path, e), a in zip(paths, jax.tree.leaves(actual)):
    e, a = np.asarray(e), np.asarray(a)
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6 * scale + 1e-30,
                               err_msg=jax.tree_util.keystr(path))


@contextlib.contextmanager
def absl_state_restored():
  """Scripts loaded in-process register their absl flags and parse them,
  which also sets absl's log level: undo both on exit, so another test module
  can load a script defining the same flags and capture INFO logs."""
  names = set(flags.FLAGS)
  level = absl_logging.get_absl_logger().level
  try:
    yield
  finally:
    for name in set(flags.FLAGS) - names:
      delattr(flags.FLAGS, name)
    absl_logging.get_absl_logger().setLevel(level)


def one_adam_state(per_module):
  """Each module's own Adam state, {name: (ScaleByAdamState, EmptyState)}, as
  the one state a reference's single `optax.adam` over the dict of modules
  has; the modules' step counts must agree."""
  counts = {int(s[0].count) for s in per_module.values()}
  assert len(counts) == 1, counts
  adam, rest = next(iter(per_module.values()))
  return (adam._replace(mu={n: s[0].mu for n, s in per_module.items()},
                        nu={n: s[0].nu for n, s in per_module.items()}),
          rest)


def load_script(name: str):
  """scripts/<name>.py loaded as the module `<name>_script` (its module-level
  absl flags are defined: load it once, inside `absl_state_restored`)."""
  spec = importlib.util.spec_from_file_location(
      f'{name}_script', os.path.join(REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_main(module, *args: str, info_logs: bool = False) -> None:
  """A loaded script's absl `main` in this process, its flags parsed from
  `args` (what `app.run` does, without exiting); `info_logs`: absl logs at
  INFO, as under app.run (set after the flags, which reset it)."""
  prog = os.path.basename(module.__file__)
  module.FLAGS.unparse_flags()
  module.FLAGS([prog, *args])
  if info_logs:
    absl_logging.set_verbosity(absl_logging.INFO)
  module.main([prog])


def tiny_ff_experiment(workdir, data_dir, **kw):
  """A feed-forward experiment small enough for a test: a 3-layer cDNI FCN
  of 16 units on the MNIST-format files in `data_dir`, 10 steps; `kw`
  overrides any setting."""
  from dni_jax import experiments  # pylint: disable=g-import-not-at-top
  args = dict(workdir=str(workdir), dataset='mnist', data_dir=data_dir,
              num_layers=3, hidden_size=16, method='cdni', sg_hidden_size=16,
              learning_rate=3e-3, lr_boundaries=(), batch_size=32,
              num_steps=10, eval_every=5, log_every=5, checkpoint_every=5)
  args.update(kw)
  return experiments.FeedForwardExperiment(**args)


def treebank_sentences(seed: int, num: int) -> str:
  """`num` made-up Penn Treebank lines (its spacing: ' w1 w2 ... \\n') of 2 to
  6 words from a 10-word vocabulary with N and <unk>."""
  rng = np.random.default_rng(seed)
  vocab = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'dog', 'ate', 'N', '<unk>']
  return ''.join(
      ' ' + ' '.join(rng.choice(vocab, size=rng.integers(2, 7))) + ' \n'
      for _ in range(num))

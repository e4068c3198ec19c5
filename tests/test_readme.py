"""The README's library examples run as written (on tiny generated data), and
its Quickstart holds the two commands, the test one being CI's."""

import os
import re

import numpy as np

import conftest
from dni_jax.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(REPO, 'README.md')) as f:
    return f.read()


def _python_blocks():
  blocks = re.findall(r'```python\n(.*?)```', _readme(), re.S)
  assert len(blocks) >= 2, 'README.md lacks its library examples'
  return blocks


def test_readme_dataset_training_and_accuracy_example_runs(tmp_path,
                                                            monkeypatch,
                                                            capsys):
  # Fashion-MNIST's default folder (Debian's package) holds generated files.
  monkeypatch.setattr(datasets, 'FASHION_MNIST_DEBIAN_DIR',
                      conftest.write_mnist_like(str(tmp_path / 'fashion')))
  namespace = {}
  code = compile(_python_blocks()[0], 'README.md', 'exec')
  exec(code, namespace)  # pylint: disable=exec-used
  ff, state, test = namespace['ff'], namespace['state'], namespace['test']
  assert int(state.step) == 2 * (512 // 256)   # Two epochs of whole batches.
  assert ff.config.resolved_sg_hidden_layers == 0   # cDNI FCN: linear (A.1).
  # The accuracy it prints, recomputed from the logits.
  logits = np.asarray(ff.predict(state, test.images))
  assert namespace['accuracy'] == np.mean(logits.argmax(-1) == test.labels)
  assert namespace['logits'].shape == (10, 10)
  out = capsys.readouterr().out
  assert 'epoch 2: training loss' in out and 'test accuracy' in out


def test_readme_decoupled_example_runs():
  namespace = {}
  code = compile(_python_blocks()[1], 'README.md', 'exec')
  exec(code, namespace)  # pylint: disable=exec-used
  assert int(namespace['state'].step) == 2
  assert namespace['sg_loss'].shape == ()


def test_quickstart_has_two_commands_and_the_test_one_is_ci_s():
  quickstart = _readme().split('## Quickstart', 1)[1].split('\n## ', 1)[0]
  commands = re.findall(r'```bash\n(.*?)```', quickstart, re.S)
  assert len(commands) == 2, commands
  assert all(c.count('\n') == 1 for c in commands), 'one line each'
  main, tests = (c.strip() for c in commands)
  assert main.startswith('pip install -r requirements.txt -e . && python ')
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    assert tests in f.read().splitlines()

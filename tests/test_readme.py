"""The README's library example runs as written."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
  with open(os.path.join(REPO, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  assert blocks, 'README.md has no python example'
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert int(namespace['state'].step) == 2
  assert namespace['sg_loss'].shape == ()

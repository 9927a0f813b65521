"""Every Python block in README.md and docs/ runs as written (from the repo
root, in a fresh interpreter)."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

BLOCKS = [(path.relative_to(REPO), i, code)
          for path in [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
          for i, code in enumerate(re.findall(r'```python\n(.*?)```', path.read_text(), re.S))]


def test_blocks_are_found():
  assert any(str(p) == 'README.md' for p, _, _ in BLOCKS)


@pytest.mark.parametrize('path,index,code', BLOCKS, ids=[f'{p}#{i}' for p, i, _ in BLOCKS])
def test_python_block_runs_as_written(path, index, code, tmp_path):
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env={'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu',
                                       'HOME': str(tmp_path)})
  assert r.returncode == 0, f'{path} block {index}:\n{r.stderr[-3000:]}'

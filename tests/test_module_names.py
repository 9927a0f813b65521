"""No module of the repo shadows a standard-library or installed package.

A script run as ``python benchmarks/x.py`` puts ``benchmarks/`` first on
``sys.path``; a ``compression.py`` there once shadowed Python 3.14's
``compression`` package, which ``import jax`` needs.
"""

import importlib.metadata
import sys

from conftest import REPO

# Standard-library modules added after Python 3.11 (sys.stdlib_module_names
# here does not list them; a newer interpreter would import ours instead).
NEWER_STDLIB = {'compression', 'annotationlib', '_pyrepl', '_interpreters', '_interpqueues',
                '_interpchannels'}
SCRIPT_DIRS = ('benchmarks', 'examples', 'tests', 'scripts', 'launch')  # first on sys.path
TOP_LEVEL = ('pemn_jax', 'configs', 'benchmarks', 'examples', 'tests', 'launch', 'scripts')


def test_no_module_shadows_a_stdlib_or_installed_package():
  taken = set(sys.stdlib_module_names) | NEWER_STDLIB
  installed = {name for name in importlib.metadata.packages_distributions()
               if not name.startswith('_')} - {'pemn_jax'}
  clashes = []
  for d in SCRIPT_DIRS:
    for path in (REPO / d).rglob('*.py') if (REPO / d).exists() else []:
      name = path.stem
      if name in ('__init__', '__main__', 'conftest'):
        continue
      if name in taken or name in installed:
        clashes.append(str(path.relative_to(REPO)))
  for name in TOP_LEVEL:
    if (REPO / name).exists() and (name in taken or name in installed):
      clashes.append(name)
  assert not clashes, f'modules named after standard/installed packages: {clashes}'
  # It would have caught the benchmark that broke `import jax` on Python 3.14.
  assert 'compression' in taken

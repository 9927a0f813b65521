"""Every command the docs show runs, at a tiny size, from the repo root.

Commands are collected from README.md, docs/, launch/README.md, examples/ and
the docstrings of configs/, pemn_jax/ and benchmarks/. Training commands get
a few steps on small slices, benchmarks ``--smoke``; paths become temporary
ones. Synopses with placeholders (``<...>``, ``...``, ``DIR``, ``[--flag]``) are
skipped; ``bash scripts/test.sh`` is this suite itself.
"""

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_folder

SOURCES = (['README.md', 'launch/README.md'] + sorted(str(p.relative_to(REPO)) for p in
           [*REPO.glob('docs/*.md'), *REPO.glob('configs/**/*.py'), *REPO.glob('pemn_jax/**/*.py'),
            *REPO.glob('benchmarks/*.py'), *REPO.glob('examples/*.py')]))
COMMAND = re.compile(r'((?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?(?:python -m pemn_jax\.[\w.]+|'
                     r'python (?:benchmarks|examples)/[\w.]+\.py|bash (?:scripts|launch)/[\w.]+)'
                     r'[^`\n#]*)')
PLACEHOLDERS = ('<', '...', ' DIR', 'HOST', 'NAME', '[--', ' X.py', 'ARGS')
TINY = ['--config.num_steps=2', '--config.train_limit=256', '--config.test_limit=100',
        '--config.batch_size=16', '--config.eval_batch_size=50', '--config.log_every=1',
        '--config.eval_every=0', '--config.checkpoint_every=1000']


def documented_commands():
  found = {}
  for rel in SOURCES:
    for line in (REPO / rel).read_text().splitlines():
      for m in COMMAND.finditer(line):
        if any(p in m.group(1) for p in PLACEHOLDERS):  # before '...' could be stripped
          continue
        cmd = m.group(1).strip().rstrip(').,;:')
        if 'scripts/test.sh' in cmd:
          continue
        if re.fullmatch(r'(\.venv/bin/)?python -m pemn_jax\.[\w.]+', cmd):
          continue  # a mention of a module (they all take flags), not a command
        if re.search(r'(benchmarks|examples)/', cmd):  # all of them run with --smoke
          cmd = re.sub(r'\s+--smoke\b', '', cmd)
        cmd = re.sub(r'^((?:[A-Z_]+=\S+\s+)*)\.venv/bin/python ', r'\1python ', cmd)  # the same
        found.setdefault(cmd, rel)
  return found


COMMANDS = documented_commands()


@pytest.fixture(scope='session')
def prepared_data():
  """The real datasets the docs use, prepared once (under a lock: xdist
  workers share the TFDS data dir)."""
  from pemn_jax.data import sources
  if not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'):
    pytest.fail('Fashion-MNIST is missing: apt-get install dataset-fashion-mnist '
                '(scripts/test.sh and scripts/quickstart.sh do)')
  data_dir = sources.default_data_dir()
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.pemn_jax_prepare.lock'), 'w') as lock:
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    for name in ('mnist', 'fashion_mnist', 'cifar10'):
      for split in ('train', 'test'):
        sources.load(name, split)
  return data_dir


def _run(argv, env, timeout=900):
  p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, f'{shlex.join(argv)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
  return p


def _map_path(value: str, tmp: Path) -> str:
  return str(tmp / value.strip('/').replace('/', '_'))


def _training(documented: str | None) -> str | None:
  """The documented training command that uses workdir ``documented`` (as a
  reader would run them, in order); None: the quickstart's."""
  for cmd in COMMANDS:
    if 'pemn_jax.main' in cmd and documented and re.search(
        rf'--workdir[= ]{re.escape(documented)}(\s|$)', cmd):
      return cmd
  return None


# Trained tiny runs shared by the tests (all xdist workers) that need the same
# one: {'dir': Path}, set by the ``shared_runs`` fixture.
_STORE: dict = {}


def _workdir(cmd: str) -> str | None:
  """The workdir a documented command names, as written."""
  m = re.search(r'--workdir[= ](\S+)', cmd)
  return m and m.group(1)


def _entry(cmd: str | None) -> tuple[Path, str]:
  """(the store's directory of ``cmd``'s run, the workdir name in it)."""
  documented = _workdir(cmd) if cmd else 'quickstart'
  key = hashlib.sha1((cmd or 'quickstart').encode()).hexdigest()[:16]
  return _STORE['dir'] / key, Path(_map_path(documented, Path())).name


@contextlib.contextmanager
def _locked(entry: Path):
  with open(f'{entry}.lock', 'w') as lock:
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    yield


def _publish(cmd: str, workdir: str):
  """Offers the run that the documented ``cmd`` trained in ``workdir`` to the
  tests that would train it again (an export of the same workdir)."""
  if not any(_training(_workdir(c)) == cmd for c in COMMANDS
             if re.search(r'pemn_jax\.(export|evolve)\b', c) and _workdir(c)):
    return
  entry, name = _entry(cmd)
  with _locked(entry):
    if not (entry / 'done').exists():
      shutil.rmtree(entry, ignore_errors=True)
      shutil.copytree(workdir, entry / name)
      (entry / 'done').touch()


def _ensure_trained(workdir: str, env, documented: str | None = None):
  """A tiny run in ``workdir``: :func:`_training`'s command (or the
  quickstart), trained once for all the tests and copied."""
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return
  cmd = _training(documented)

  def train(path: Path):  # the run trained at path (named as tiny() maps its workdir)
    if cmd:
      argv, env2 = tiny(cmd, path.parent, env.get('JAX_COMPILATION_CACHE_DIR'))
      assert f'--workdir={path}' in argv, (path, argv)
    else:
      argv, env2 = [sys.executable, '-m', 'pemn_jax.main', '--config', 'configs/quickstart.py',
                    f'--workdir={path}', *TINY], env
    _run(argv, env2)

  entry, name = _entry(cmd)
  with _locked(entry):
    if not (entry / 'done').exists():
      shutil.rmtree(entry, ignore_errors=True)
      entry.mkdir(parents=True)
      train(entry / name)
      (entry / 'done').touch()
  shutil.copytree(entry / name, workdir)


def tiny(cmd: str, tmp: Path, cache: str | None = None):
  """(argv, env) of a documented command, made small and pointed at tmp;
  with ``cache``, its processes share that persistent compilation cache."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  words = shlex.split(cmd)
  while words and re.fullmatch(r'[A-Z_]+=\S+', words[0]):
    k, v = words.pop(0).split('=', 1)
    env[k] = v
  if words[0] in ('python', '.venv/bin/python'):
    words[0] = sys.executable
  out, documented = [], {}
  it = iter(words)
  for w in it:  # paths given to --workdir / --out / --artifact / --params_dir go to tmp
    flag, eq, value = w.partition('=')
    if flag in ('--workdir', '--out', '--artifact', '--params_dir'):
      value = value if eq else next(it)
      documented[flag] = value
      out.append(f'{flag}={_map_path(value, tmp)}')
    elif flag == '--import':  # the guide's module, saved where the docs say
      value = value if eq else next(it)
      if value.endswith('.py') and not (REPO / value).exists():
        guide = (REPO / 'docs' / 'adding_a_method.md').read_text()
        (tmp / value).write_text(re.search(r'```python\n(.*?)```', guide, re.S).group(1))
        value = str(tmp / value)
      out.append(f'--import={value}')
    else:
      out.append(w)
  joined = ' '.join(out)
  if 'folder:' in joined:  # an image folder: a small generated one, decoded at 32 px
    folder = make_folder(tmp / 'images', (6, 2))
    out = [re.sub(r'folder:[^,\s]+', f'folder:{folder}', w) for w in out]
    if 'pemn_jax.main' in joined:
      out.append('--config.image_size=32')
    joined = ' '.join(out)
  if 'pemn_jax.plot' in joined:  # its positional arguments are runs: train tiny ones
    start = out.index('pemn_jax.plot') + 1
    for i in range(start, len(out)):
      if not out[i].startswith('-') and not out[i - 1] == '--out':
        out[i] = str(tmp / f'run_{i}')
        _ensure_trained(out[i], env)
  if 'pemn_jax.main' in joined or 'launch/local.sh' in joined:
    out += TINY
  elif 'pemn_jax.ablate' in joined:
    out += ['--set=' + t.removeprefix('--config.') for t in TINY] + ['--noplots']
  elif 'pemn_jax.evolve' in joined:
    out += ['--population=4', '--calibration=64', '--finetune_steps=2', '--quant_finetune=5']
  elif 'scripts/quickstart.sh' in joined:
    env['WORKDIR'] = str(tmp / 'quickstart')
    env['PYTHON'] = sys.executable
    out += TINY
  elif re.search(r'(benchmarks|examples)/', joined):
    out.append('--smoke')
  if 'launch/local.sh' in joined:
    env['PYTHON'] = sys.executable
  for w in out:  # export / evaluate need a trained run / a model file
    if w.startswith('--workdir=') and ('pemn_jax.export' in joined or 'pemn_jax.evolve' in joined):
      _ensure_trained(w.split('=', 1)[1], env, documented.get('--workdir'))
    if w.startswith('--artifact='):
      path = w.split('=', 1)[1]
      if not os.path.exists(path):
        wd = str(tmp / 'for_artifact')
        _ensure_trained(wd, env)
        _run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={wd}', f'--out={path}'], env)
  return out, env


def test_commands_are_found():
  assert any('scripts/quickstart.sh' in c for c in COMMANDS)
  assert any('pemn_jax.export' in c for c in COMMANDS)
  assert any('benchmarks/' in c for c in COMMANDS)
  assert len(COMMANDS) >= 20, sorted(COMMANDS)


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache for this worker's commands. Many of
  them compile the same programs (the quickstart trained before each export,
  a benchmark's variants); a program found there is not compiled again. One
  directory per xdist worker (its own basetemp), so no two processes write
  one entry at once. Each program is still compiled by the first command
  that needs it."""
  return str(tmp_path_factory.mktemp('compile_cache'))


@pytest.fixture(scope='session')
def shared_runs(tmp_path_factory):
  """Where tiny trained runs are kept for the tests that need the same one
  (one directory for all xdist workers: their basetemps' parent)."""
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'trained_runs'
  path.mkdir(exist_ok=True)
  _STORE['dir'] = path
  yield path
  _STORE.clear()


# Training commands first: an export of the same workdir then finds their run.
@pytest.mark.parametrize('cmd', sorted(COMMANDS, key=lambda c: ('pemn_jax.main' not in c, c)),
                         ids=lambda c: c[:70])
def test_documented_command_runs(cmd, tmp_path, prepared_data, compile_cache, shared_runs):
  argv, env = tiny(cmd, tmp_path, compile_cache)
  _run(argv, env)
  workdir = next((w.split('=', 1)[1] for w in argv if w.startswith('--workdir=')), None)
  if 'pemn_jax.main' in cmd and workdir:
    _publish(cmd, workdir)

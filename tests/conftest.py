"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import models


def tiny_target(shapes: dict[str, tuple[int, ...]]):
  """A params target from ``{'Layer/kernel': shape}`` (ShapeDtypeStructs)."""
  from pemn_jax.pytrees import unflatten
  return unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})


@pytest.fixture
def mlp_target():
  m = models.get('mlp', hidden=(24, 16))
  return models.abstract_params(m, (6, 6, 1))


def tree_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


REPO = __import__('pathlib').Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / 'shared' / 'data' / 'mnist'


def minimal_header():
  """A model-file header that passes the schema (for codec-level tests)."""
  return {'format': 'pemn_jax model', 'pemn_jax_version': '0', 'jax_version': '0', 'model': 'mlp',
          'model_kwargs': {}, 'num_classes': 10, 'input_shape': [28, 28, 1],
          'param': {'name': 'dense'}, 'seed': 0, 'dataset': 'mnist', 'step': 0}


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'configs_{name}', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _write_idx(path, arr):
  import gzip
  import struct
  header = struct.pack('>BBBB', 0, 0, 0x08, arr.ndim) + struct.pack('>' + 'I' * arr.ndim,
                                                                     *arr.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope='session')
def mnist_slice(tmp_path_factory):
  """A small real slice of MNIST (600 train, 200 test) as IDX .gz files, and
  a TFDS data dir to prepare it into. Falls back to synthetic digits-like data
  only if ../shared/data/mnist is missing."""
  from pemn_jax.data.builders import read_idx
  src = tmp_path_factory.mktemp('mnist_src')
  for n, (img, lab) in [(600, ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')),
                        (200, ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'))]:
    if (SHARED_MNIST / img).exists():
      images, labels = read_idx(str(SHARED_MNIST / img))[:n], read_idx(str(SHARED_MNIST / lab))[:n]
    else:  # pragma: no cover - CI has ../shared
      rng = np.random.default_rng(0)
      labels = rng.integers(0, 10, n).astype(np.uint8)
      images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
      for i, y in enumerate(labels):
        images[i, 2 * y:2 * y + 8, 4:24] = 255
    _write_idx(src / img, images)
    _write_idx(src / lab, labels)
  return {'source_dir': str(src), 'data_dir': str(tmp_path_factory.mktemp('tfds'))}


def tiny_config(mnist_slice, **overrides):
  """A few-second training config on the MNIST slice."""
  from pemn_jax.config import base_config
  c = base_config()
  c.dataset = 'mnist'
  c.source_dir = mnist_slice['source_dir']
  c.data_dir = mnist_slice['data_dir']
  c.model = 'mlp'
  c.model_kwargs.hidden = (32,)
  c.batch_size = 32
  c.eval_batch_size = 100
  c.num_steps = 24
  c.log_every = 4
  c.checkpoint_every = 8
  c.optimizer.update(name='adamw', lr=3e-3, schedule='constant')
  for k, v in overrides.items():
    if k == 'param':
      c.param = v
    elif '.' in k:
      a, b = k.split('.')
      c[a][b] = v
    else:
      c[k] = v
  return c


def saved_train_state(workdir):
  """The newest checkpoint's whole train state as orbax saved it (nested dicts
  and lists of arrays, read without a target): the optimizer state included,
  which ``restore`` does not read."""
  import orbax.checkpoint as ocp
  d = __import__('pathlib').Path(workdir) / 'checkpoints'
  step = max(int(p.name) for p in d.iterdir() if p.name.isdigit())
  return ocp.PyTreeCheckpointer().restore(str(d / str(step) / 'state'))


def make_folder(root, per_class=(6, 2), seed=0, classes=('cat', 'dog', 'emu')):
  """An image folder: ``root/train`` and ``root/val``, one subfolder per class
  of random images of mixed sizes (24-89 px), JPEG and PNG. Returns the train
  folder."""
  import os

  from PIL import Image
  rng = np.random.default_rng(seed)
  for split, n in zip(('train', 'val'), per_class, strict=True):
    for c in classes:
      d = os.path.join(root, split, c)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        w, h = (int(v) for v in rng.integers(24, 90, 2))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        img.save(os.path.join(d, f'{i}.{"png" if i % 3 == 0 else "jpg"}'))
  return os.path.join(root, 'train')


@contextlib.contextmanager
def mounted(argv_mount, path):
  """Runs ``mount`` (root only) and unmounts ``path`` after; yields False
  if it cannot."""
  if os.geteuid() != 0 or not shutil.which('mount'):
    yield False
    return
  ok = subprocess.run(argv_mount, capture_output=True).returncode == 0
  try:
    yield ok
  finally:
    if ok:
      subprocess.run(['umount', '-l', path], capture_output=True)


def read_only_bind(path):
  """``mounted``: ``path`` bind-mounted read-only onto itself (a read-only
  directory that root cannot write either)."""
  return mounted(['sh', '-c', f'mount --bind "{path}" "{path}" && '
                  f'mount -o remount,ro,bind "{path}"'], path)

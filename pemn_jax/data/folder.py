"""Image-folder datasets (``folder:PATH``): one subfolder per class of JPEG/PNG
files, prepared once into array_record files holding the *encoded* bytes (as
TFDS stores ImageNet) and read back through ``data_source``.

Splits: ``PATH`` is the training split and its sibling ``val``,
``validation`` or ``test`` folder the evaluation split (ImageNet's
``train/`` + ``val/``); or ``PATH`` holds ``train/`` and one of those.
Labels are the sorted class-folder names of the training split (written to
``labels.txt`` beside the prepared data). Files whose names start with ``.``
are ignored; anything else that is not a readable JPEG/PNG, an empty class,
an evaluation class the training split lacks, or a folder that changed since
it was prepared is an error naming it (``DataError``), never a silent skip.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from pemn_jax.data import builders

EXTENSIONS = ('.jpg', '.jpeg', '.png')
EVAL_NAMES = ('val', 'validation', 'test')
FORMATS = ('JPEG', 'PNG')
INFO = 'pemn_folder.json'


class FolderError(ValueError):
  """An image folder that cannot be used as it is (``sources`` reports it as a
  DataError)."""


def _classes(root: str) -> list[str]:
  return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def split_dirs(path: str) -> dict[str, str]:
  """``{'train': dir, 'test': dir}`` for ``folder:PATH``."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FolderError(f'folder:{path}: no such directory')
  inside = [n for n in EVAL_NAMES if os.path.isdir(os.path.join(path, n))]
  if os.path.isdir(os.path.join(path, 'train')) and inside:
    return {'train': os.path.join(path, 'train'), 'test': os.path.join(path, inside[0])}
  parent = os.path.dirname(path)
  beside = [n for n in EVAL_NAMES if os.path.isdir(os.path.join(parent, n))
            and os.path.join(parent, n) != path]
  if not beside:
    raise FolderError(f'folder:{path}: no evaluation split: put held-out images in a sibling '
                      f'folder ({" / ".join(os.path.join(parent, n) for n in EVAL_NAMES)}) with '
                      'the same class subfolders, or give a folder holding train/ and val/')
  return {'train': path, 'test': os.path.join(parent, beside[0])}


def listing(root: str, classes: list[str] | None = None) -> list[tuple[str, int, int]]:
  """``(path relative to root, label, bytes)`` of every image, sorted.

  Args:
    root: a split's folder (one subfolder per class).
    classes: the label names (default: ``root``'s own class folders).
  Raises:
    FolderError: no classes, an empty class, a class not in ``classes``, or
      a file that is not .jpg/.jpeg/.png.
  """
  found = _classes(root)
  if not found:
    raise FolderError(f'{root} has no class subfolders (expected {root}/<class>/<image>.jpg)')
  classes = found if classes is None else classes
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise FolderError(f'{root} has classes the training split lacks: {unknown[:5]}')
  out = []
  for name in found:
    files = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      for f in filenames:
        if f.startswith('.'):
          continue
        full = os.path.join(dirpath, f)
        if not f.lower().endswith(EXTENSIONS):
          raise FolderError(f'{full} is not an image ({"/".join(EXTENSIONS)}); move it out of '
                            f'{root}')
        files.append((os.path.relpath(full, root), classes.index(name), os.path.getsize(full)))
    if not files:
      raise FolderError(f'class folder {os.path.join(root, name)} has no images')
    out.extend(sorted(files))
  return out


def fingerprint(files) -> str:
  return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def check_image(path: str, data: bytes):
  """FolderError unless ``data`` is a JPEG/PNG that PIL can parse."""
  import io

  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as img:
      fmt = img.format
      img.verify()
  except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
    raise FolderError(f'{path} is not a readable image: {type(e).__name__}: {e}') from None
  if fmt not in FORMATS:
    raise FolderError(f'{path} is a {fmt} image; JPEG and PNG are supported')


class FolderImages(tfds.core.GeneratorBasedBuilder):
  """The prepared form of an image folder: ``image`` (the file's encoded
  bytes, uint8), ``label`` and ``name`` (its path in the folder, uint8)."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, dirs: dict[str, str], classes: list[str], files: dict, **kwargs):
    self._dirs, self._classes, self._files = dirs, classes, files
    super().__init__(**kwargs)

  def __getstate__(self):  # (decode workers read a prepared copy: no file list)
    return {**super().__getstate__(), 'folder': (self._dirs, self._classes)}

  def __setstate__(self, state):
    dirs, classes = state['folder']
    self.__init__(dirs=dirs, classes=classes, files={}, **state['_original_state'])

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=f'image folder {self._dirs["train"]}',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=self._classes),
            'name': tfds.features.Tensor(shape=(None,), dtype=np.uint8)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in self._dirs}

  def _generate_examples(self, split):
    for rel, label, _ in self._files[split]:
      path = os.path.join(self._dirs[split], rel)
      with open(path, 'rb') as f:
        data = f.read()
      check_image(path, data)
      yield rel, {'image': np.frombuffer(data, np.uint8), 'label': label,
                  'name': np.frombuffer(rel.encode(), np.uint8)}


def builder(path: str, data_dir: str, prepare: bool = True) -> FolderImages:
  """The prepared ``FolderImages`` of ``folder:path`` in ``data_dir``,
  preparing it on first use.

  Raises:
    FolderError: a bad folder (see the module docstring), or one that
      changed since it was prepared.
  """
  dirs = split_dirs(path)
  train = listing(dirs['train'])
  classes = _classes(dirs['train'])
  files = {'train': train, 'test': listing(dirs['test'], classes)}
  key = hashlib.sha256(dirs['train'].encode()).hexdigest()[:12]
  where = os.path.join(data_dir, 'folders', f'{os.path.basename(dirs["train"])}-{key}')
  info = {'dirs': dirs, 'classes': classes,
          'splits': {s: {'files': len(f), 'digest': fingerprint(f)} for s, f in files.items()}}
  info_path = os.path.join(where, INFO)
  b = FolderImages(dirs=dirs, classes=classes, files=files, data_dir=where,
                   file_format='array_record')
  if os.path.exists(info_path) and b.is_prepared():
    with open(info_path) as f:
      old = json.load(f)
    if old != info:
      counts = {s: (old.get('splits', {}).get(s, {}).get('files'), v['files'])
                for s, v in info['splits'].items()}
      raise FolderError(
          f'folder:{path} changed since it was prepared into {where} (images per split then, '
          f'now: {counts}; or renamed/resized files or classes). Remove {where} to prepare it '
          'again, or restore the folder')
    return b
  if not prepare:
    raise FolderError(f'folder:{path} is not prepared in {where}')
  builders.prepare(b, f'folder:{path}')
  with open(os.path.join(where, 'labels.txt'), 'w') as f:
    f.write(''.join(f'{i}\t{c}\n' for i, c in enumerate(classes)))
  with open(info_path, 'w') as f:
    json.dump(info, f, indent=1)
  return b

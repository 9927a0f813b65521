"""Dataset access: local builders prepared once into ``data_dir``, image
folders (``folder:PATH``, ``pemn_jax.data.folder``), or standard TFDS datasets
already prepared there. Read with ``data_source`` (random access, no
TensorFlow, never a download). Datasets of variable image size (folders,
``tfds:imagenet2012``, ``tfds:imagenette``) are read as encoded bytes and
decoded at ``image_size`` by a ``decode.Decoder``."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from pemn_jax.data import builders, decode, folder

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED = os.path.normpath(os.path.join(_HERE, '..', '..', '..', 'shared', 'data'))

# name -> (builder class, default source dir, mean, std per channel (0..1 scale))
LOCAL = {
    'mnist': (builders.LocalMnist, os.path.join(_SHARED, 'mnist'), (0.1307,), (0.3081,)),
    'fashion_mnist': (builders.LocalFashionMnist, '/usr/share/datasets/fashion-mnist',
                      (0.2860,), (0.3530,)),
    'cifar10': (builders.LocalCifar10Jpeg, os.path.join(_SHARED, 'cifar10_jpeg'),
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Standard TFDS datasets (prepared by the user in data_dir): 'tfds:<name>'.
STANDARD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Standard TFDS datasets of variable image size (encoded JPEGs), decoded at image_size.
VARIABLE = {'imagenet2012': IMAGENET_STATS, 'imagenette': IMAGENET_STATS}
# What a run evaluates on ('test') for these: their labelled held-out split
# (imagenet2012's 'test' split, where prepared, has no labels).
EVAL_SPLIT = {'imagenet2012': 'validation', 'imagenette': 'validation'}
FOLDER = 'folder:'
DATASETS = (sorted(LOCAL) + [f'tfds:{n}' for n in sorted({**STANDARD, **VARIABLE})]
            + [FOLDER + 'PATH'])
IMAGE_SHAPES = {'mnist': (28, 28, 1), 'fashion_mnist': (28, 28, 1), 'cifar10': (32, 32, 3),
                'tfds:cifar10': (32, 32, 3), 'tfds:cifar100': (32, 32, 3)}
DEFAULT_IMAGE_SIZE = 224  # variable-size datasets without config.image_size


def is_known(name) -> bool:
  return isinstance(name, str) and (name in DATASETS[:-1] or (
      name.startswith(FOLDER) and len(name) > len(FOLDER)))


def is_variable(name: str) -> bool:
  """Whether ``name``'s images are decoded to ``image_size`` (variable size)."""
  return name.startswith(FOLDER) or name[5:] in VARIABLE


def image_shape(name: str, image_size: int | None = None) -> tuple[int, ...]:
  """A dataset's image shape, known without opening it: ``image_size``
  (default 224) square RGB for variable-size datasets."""
  if is_variable(name):
    side = image_size or DEFAULT_IMAGE_SIZE
    return (side, side, 3)
  return IMAGE_SHAPES.get(name, (32, 32, 3))


class DataError(ValueError):
  """A dataset that cannot be found or read, with what to do about it."""


@dataclasses.dataclass
class Dataset:
  name: str
  source: object           # random-access: len(), __getitems__/[] -> dict examples
  num_examples: int
  image_shape: tuple
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  decoder: decode.Decoder | None = None  # variable-size datasets: their records hold bytes


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def _info_shape(info):
  feat = info.features['image']
  return tuple(feat.shape), info.features['label'].num_classes


def load(name: str, split: str, data_dir: str | None = None, source_dir: str | None = None,
         prepare: bool = True, image_size: int | None = None,
         workers: int | None = None) -> Dataset:
  """Opens ``split`` of dataset ``name`` (see ``DATASETS``) as a data source.

  Local datasets and image folders are prepared into ``data_dir`` (local
  ones from ``source_dir``, default: their usual place) the first time;
  standard ones must already be prepared.

  Args:
    name, split: the dataset and split ('train' or 'test'; 'test' is the
      'validation' split of datasets evaluated on it, ``EVAL_SPLIT``).
    data_dir: where prepared datasets live (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    source_dir: local files to prepare from.
    prepare: prepare a local dataset if it is not yet.
    image_size: variable-size datasets: the decoded side (default 224).
    workers: variable-size datasets: decoding processes (default: the
      host's cores; 0 = in this process).
  Returns:
    The ``Dataset``.
  Raises:
    DataError: naming what is missing or wrong.
  """
  data_dir = data_dir or default_data_dir()
  if not is_known(name):
    raise DataError(f'unknown dataset {name!r}; known: {DATASETS}')
  decoder = None
  if is_variable(name):
    try:
      decoder = decode.Decoder(image_shape(name, image_size)[0],
                               decode.default_workers() if workers is None else workers)
    except ValueError as e:
      raise DataError(str(e)) from None
  mean, std = IMAGENET_STATS
  if name.startswith(FOLDER):
    try:
      builder = folder.builder(name[len(FOLDER):], data_dir, prepare)
    except folder.FolderError as e:
      raise DataError(str(e)) from None
    not_prepared = f'{name} could not be read from {data_dir!r}'
  elif name.startswith('tfds:'):
    tfds_name = name[5:]
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - report any registry/IO failure the same way
      raise DataError(f'cannot open TFDS dataset {tfds_name!r} in {data_dir!r}: {e}') from e
    not_prepared = (
        f'TFDS dataset {tfds_name!r} is not prepared in data_dir={data_dir!r} (expected '
        f'{builder.data_dir}). Prepare it there once (tfds build {tfds_name} '
        f'--data_dir={data_dir} --file_format=array_record, on a machine that may download), '
        'or point config.data_dir at a directory that holds it.')
    mean, std = {**STANDARD, **VARIABLE}[tfds_name]
    split = EVAL_SPLIT.get(tfds_name, 'test') if split == 'test' else split
  else:
    cls, default_src, mean, std = LOCAL[name]
    with builders.quiet():
      builder = cls(data_dir=data_dir, source_dir=source_dir or default_src,
                    file_format='array_record')
      prepared = builder.is_prepared()
    if not prepared:
      if not prepare:
        raise DataError(f'{name} is not prepared in {data_dir!r}')
      try:
        builders.prepare(builder, name)
      except builders.SourceMissingError as e:
        raise DataError(str(e)) from e
      except OSError as e:  # an unwritable or vanished data_dir
        from pemn_jax.train.workdir import fs_error
        raise DataError(fs_error(f'cannot prepare {name} into data_dir={data_dir!r} '
                                 '(config.data_dir)', e)) from e
    not_prepared = f'{name} could not be read from {data_dir!r}'
  try:
    skip = {'image': tfds.decode.SkipDecoding()} if decoder and name.startswith('tfds:') else None
    source = builder.as_data_source(split=split, decoders=skip)
  except Exception as e:  # noqa: BLE001 - not prepared / missing split / unreadable files
    if split not in (builder.info.splits or {split: None}):
      raise DataError(f'{name} has no split {split!r}; splits: '
                      f'{sorted(builder.info.splits)}') from e
    raise DataError(f'{not_prepared} ({type(e).__name__}: {str(e)[:300]})') from e
  shape, classes = _info_shape(builder.info)
  if decoder is not None:
    shape = image_shape(name, image_size)
  return Dataset(name=name, source=source, num_examples=len(source), image_shape=shape,
                 num_classes=classes, mean=np.asarray(mean, np.float32),
                 std=np.asarray(std, np.float32), decoder=decoder)


class _Arrays:
  """A random-access source over in-memory arrays (``generated``)."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': self.labels[i]}

  def __getitems__(self, keys):
    return [self[i] for i in keys]


def generated(num_examples: int, image_shape, num_classes: int, seed: int = 0,
              name: str = 'generated') -> Dataset:
  """A dataset of random uint8 images and labels (shapes and step costs
  without real data: tests, ``benchmarks/fullscale.py``).

  Args:
    num_examples: how many.
    image_shape: ``(H, W, C)``.
    num_classes: labels are drawn from ``range(num_classes)``.
    seed: the draws' seed.
    name: what the dataset is called.
  Returns:
    The ``Dataset`` (mean 0.5, std 0.25 per channel).
  """
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  channels = image_shape[-1]
  return Dataset(name, _Arrays(images, labels), num_examples, tuple(image_shape), num_classes,
                 np.full(channels, 0.5, np.float32), np.full(channels, 0.25, np.float32))

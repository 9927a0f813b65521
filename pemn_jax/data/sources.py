"""Dataset access: local builders prepared once into ``data_dir``, or standard
TFDS datasets already prepared there. Read with ``data_source`` (random access,
no TensorFlow, never a download)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from pemn_jax.data import builders

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
# (Datasets of variable image size, e.g. imagenet2012, need a resize/crop
# pipeline this trainer does not have yet: not offered.)
DATASETS = sorted(LOCAL) + [f'tfds:{n}' for n in sorted(STANDARD)]
IMAGE_SHAPES = {'mnist': (28, 28, 1), 'fashion_mnist': (28, 28, 1), 'cifar10': (32, 32, 3),
                'tfds:cifar10': (32, 32, 3), 'tfds:cifar100': (32, 32, 3)}


def image_shape(name: str, default=(32, 32, 3)) -> tuple[int, ...]:
  """A dataset's image shape, known without opening it (``default`` if not)."""
  return IMAGE_SHAPES.get(name, default)


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


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def _info_shape(info):
  feat = info.features['image']
  return tuple(feat.shape), info.features['label'].num_classes


def load(name: str, split: str, data_dir: str | None = None, source_dir: str | None = None,
         prepare: bool = True) -> Dataset:
  """Opens ``split`` of dataset ``name`` (see ``DATASETS``) as a data source.

  Local datasets are prepared into ``data_dir`` from ``source_dir`` (default:
  their usual place) the first time; standard ones must already be prepared.
  """
  data_dir = data_dir or default_data_dir()
  if name.startswith('tfds:'):
    tfds_name = name[5:]
    if tfds_name not in STANDARD:
      raise DataError(f'unknown dataset {name!r}; known: {DATASETS}')
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - report any registry/IO failure the same way
      raise DataError(f'cannot open TFDS dataset {tfds_name!r} in {data_dir!r}: {e}') from e
    not_prepared = (
        f'TFDS dataset {tfds_name!r} is not prepared in data_dir={data_dir!r} (expected '
        f'{builder.data_dir}). Prepare it there once (tfds build {tfds_name} '
        f'--data_dir={data_dir} --file_format=array_record, on a machine that may download), '
        'or point config.data_dir at a directory that holds it.')
    mean, std = STANDARD[tfds_name]
  else:
    if name not in LOCAL:
      raise DataError(f'unknown dataset {name!r}; known: {DATASETS}')
    cls, default_src, mean, std = LOCAL[name]
    builder = cls(data_dir=data_dir, source_dir=source_dir or default_src,
                  file_format='array_record')
    if not builder.is_prepared():
      if not prepare:
        raise DataError(f'{name} is not prepared in {data_dir!r}')
      try:
        builder.download_and_prepare()
      except builders.SourceMissingError as e:
        raise DataError(str(e)) from e
    not_prepared = f'{name} could not be read from {data_dir!r}'
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001 - not prepared / missing split / unreadable files
    if split not in (builder.info.splits or {split: None}):
      raise DataError(f'{name} has no split {split!r}; splits: '
                      f'{sorted(builder.info.splits)}') from e
    raise DataError(f'{not_prepared} ({type(e).__name__}: {str(e)[:300]})') from e
  shape, classes = _info_shape(builder.info)
  return Dataset(name=name, source=source, num_examples=len(source), image_shape=shape,
                 num_classes=classes, mean=np.asarray(mean, np.float32),
                 std=np.asarray(std, np.float32))

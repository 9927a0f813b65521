"""TFDS builders that prepare datasets from local files: no download, no TensorFlow.

Each is a ``tfds.core.GeneratorBasedBuilder`` writing ``array_record`` files,
read back with ``builder.as_data_source(split)``. Images are stored as
``tfds.features.Tensor`` uint8 arrays (TFDS's ``Image`` feature needs TensorFlow
to encode).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import struct
import tarfile

import numpy as np
import tensorflow_datasets as tfds


@contextlib.contextmanager
def quiet():
  """TFDS's messages while a local builder is opened and prepared hidden
  ("Downloading and preparing dataset ..." though nothing is downloaded, a
  missing-info warning for a folder not prepared yet); errors still show."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


def prepare(builder, name: str) -> None:
  """``builder.download_and_prepare()``, saying so in one line of ours."""
  with quiet():
    builder.download_and_prepare()
  print(f'{name}: prepared once into {builder.data_dir} (later runs read it there)', flush=True)

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
IDX_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
             'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


class SourceMissingError(FileNotFoundError):
  """The local files a dataset is prepared from are not where expected."""


def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) IDX file into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path} is not an IDX file (bad magic number)')
  ndim = data[3]
  dims = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
  arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if data[2] != 0x08 or arr.size != int(np.prod(dims)):
    raise ValueError(f'{path}: unsupported IDX type or truncated file '
                     f'({arr.size} bytes for {dims})')
  return arr.reshape(dims)


def _need(path: str, what: str, hint: str) -> str:
  if not os.path.exists(path):
    raise SourceMissingError(f'{what}: expected {path!r}, which does not exist. {hint}')
  return path


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder that prepares from files in ``source_dir`` (never downloads)."""

  VERSION = tfds.core.Version('1.0.0')
  HINT = ''

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _source(self, filename: str) -> str:
    """Path of a source file; a SourceMissingError naming it if absent."""
    if not self._source_dir:
      raise SourceMissingError(f'{self.name}: no source directory given. {self.HINT}')
    return _need(os.path.join(self._source_dir, filename), self.name, self.HINT)


class _IdxBuilder(_LocalFilesBuilder):
  """Shared code of the MNIST-format builders (28x28x1 uint8, 10 classes)."""

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.name}: prepared from local IDX files.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    paths = {split: [self._source(n) for n in names] for split, names in IDX_FILES.items()}
    return {split: self._generate_examples(*p) for split, p in paths.items()}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
      raise ValueError(f'{images_path}: expected N x 28 x 28 images matching {labels_path}')
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
      yield i, {'image': img[..., None], 'label': int(lab)}


class LocalMnist(_IdxBuilder):
  """MNIST from the standard IDX .gz files (e.g. ``../shared/data/mnist``)."""
  HINT = ('Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz '
          'and t10k-labels-idx1-ubyte.gz there (config.source_dir), e.g. ../shared/data/mnist.')


class LocalFashionMnist(_IdxBuilder):
  """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX .gz files."""
  HINT = ('Install them with `apt-get install dataset-fashion-mnist` '
          '(files in /usr/share/datasets/fashion-mnist/) or set config.source_dir.')


class LocalCifar10Jpeg(_LocalFilesBuilder):
  """CIFAR-10 from ``train.tar.gz`` / ``test.tar.gz`` of ``split/class/n.jpg``
  32x32 JPEGs (``../shared/data/cifar10_jpeg``); TFDS's label order."""

  HINT = ('Put train.tar.gz and test.tar.gz (split/<class>/<n>.jpg) there (config.source_dir), '
          'e.g. ../shared/data/cifar10_jpeg.')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='CIFAR-10 prepared from local JPEG tars (lossy copy of CIFAR-10).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(CIFAR10_CLASSES)),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(self._source(f'{s}.tar.gz')) for s in ('train', 'test')}

  def _generate_examples(self, tar_path):
    from PIL import Image  # only needed to prepare

    with tarfile.open(tar_path, 'r:gz') as tar:
      for member in tar:
        if not member.isfile() or not member.name.lower().endswith(('.jpg', '.jpeg')):
          continue
        parts = member.name.split('/')
        if len(parts) < 2 or parts[-2] not in CIFAR10_CLASSES:
          raise ValueError(f'{tar_path}: {member.name} is not under a CIFAR-10 class folder')
        img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB')
        arr = np.asarray(img, np.uint8)
        if arr.shape != (32, 32, 3):
          raise ValueError(f'{tar_path}: {member.name} has shape {arr.shape}, expected 32x32x3')
        yield member.name, {'image': arr, 'label': CIFAR10_CLASSES.index(parts[-2])}

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pemn_jax.data import sources
from pemn_jax.data.pipeline import Pipeline


def test_local_mnist_prepares_and_reads_without_tensorflow(mnist_slice):
  import sys
  ds = sources.load('mnist', 'train', mnist_slice['data_dir'], mnist_slice['source_dir'])
  assert ds.num_examples == 600 and ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  ex = ds.source[0]
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (28, 28, 1)
  assert 'tensorflow' not in sys.modules or not hasattr(sys.modules['tensorflow'], 'constant')


@pytest.mark.parametrize('augment', [True, 'cifar', 'pemn'])
def test_pipeline_is_deterministic_and_process_slices_make_the_global_batch(mnist_slice, augment):
  ds = sources.load('mnist', 'train', mnist_slice['data_dir'], mnist_slice['source_dir'])
  a = Pipeline(ds, 64, seed=3, augment=augment)
  b = Pipeline(ds, 64, seed=3, augment=augment)
  for step in (0, 5, 9, 10):  # 9 steps per epoch: 10 is in the second epoch
    np.testing.assert_array_equal(a.batch(step)[0], b.batch(step)[0])
  assert not np.array_equal(a.batch(0)[1], a.batch(9)[1])
  assert not np.array_equal(a.batch(0)[0], Pipeline(ds, 64, seed=4, augment=augment).batch(0)[0])
  parts = [Pipeline(ds, 64, seed=3, augment=augment, process_index=i, process_count=2).batch(4)
           for i in range(2)]
  glob = a.batch(4)
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), glob[0])
  np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), glob[1])
  # An epoch visits every example once.
  seen = np.concatenate([a.order(0)[i * 64:(i + 1) * 64] for i in range(a.steps_per_epoch)])
  assert len(set(seen.tolist())) == len(seen)


def test_examples_by_index_are_the_raw_records_normalized(mnist_slice):
  """``examples(order(0)[:k])`` is batch 0 of a k-example pipeline (the
  evolution's calibration batch), built here from the source's records."""
  ds = sources.load('mnist', 'train', mnist_slice['data_dir'], mnist_slice['source_dir'])
  p = Pipeline(ds, 128, seed=5, limit=300)
  idx = p.order(0)[:50]
  assert idx.max() < 300
  x, y = p.examples(idx)
  recs = [ds.source[int(i)] for i in idx]
  want = (np.stack([r['image'] for r in recs]).astype(np.float32) / 255 - ds.mean) / ds.std
  np.testing.assert_allclose(x, want, rtol=1e-6)
  np.testing.assert_array_equal(y, [r['label'] for r in recs])
  np.testing.assert_array_equal(x, Pipeline(ds, 50, seed=5, limit=300).batch(0)[0])


def test_eval_batches_cover_the_split_once(mnist_slice):
  ds = sources.load('mnist', 'test', mnist_slice['data_dir'], mnist_slice['source_dir'])
  p = Pipeline(ds, 64, seed=0)
  total = sum(float(w.sum()) for _, _, w in p.eval_batches())
  assert total == 200


def test_missing_source_dir_names_the_path(tmp_path):
  with pytest.raises(sources.DataError, match='nowhere.*train-images-idx3-ubyte.gz'):
    sources.load('mnist', 'train', str(tmp_path / 'tfds'), str(tmp_path / 'nowhere'))
  with pytest.raises(sources.DataError, match='unknown dataset'):
    sources.load('svhn', 'train', str(tmp_path))


def test_standard_tfds_not_prepared_is_a_clear_error(tmp_path):
  with pytest.raises(sources.DataError, match='not prepared'):
    sources.load('tfds:cifar10', 'train', str(tmp_path))


def test_standard_tfds_cifar10_through_mock_data():
  with tfds.testing.mock_data(num_examples=70):
    ds = sources.load('tfds:cifar10', 'train')
    assert ds.num_examples == 70 and ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    images, labels = Pipeline(ds, 32, seed=0, augment=True).batch(1)
  assert images.shape == (32, 32, 32, 3) and images.dtype == np.float32
  assert labels.shape == (32,) and labels.max() < 10


def _jpeg_tar(path, split, per_class):
  import io
  import tarfile

  from PIL import Image

  from pemn_jax.data.builders import CIFAR10_CLASSES
  with tarfile.open(path, 'w:gz') as tar:
    for c, name in enumerate(CIFAR10_CLASSES):
      for k in range(per_class):
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 20 * c + k, np.uint8)).save(buf, format='JPEG',
                                                                          quality=100)
        info = tarfile.TarInfo(f'{split}/{name}/{k}.jpg')
        info.size = buf.tell()
        buf.seek(0)
        tar.addfile(info, buf)


def test_cifar10_jpeg_builder_keeps_tfds_label_order(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  _jpeg_tar(src / 'train.tar.gz', 'train', 2)
  _jpeg_tar(src / 'test.tar.gz', 'test', 1)
  ds = sources.load('cifar10', 'test', str(tmp_path / 'tfds'), str(src))
  assert ds.num_examples == 10 and ds.image_shape == (32, 32, 3)
  for i in range(10):
    ex = ds.source[i]
    # Each class's image is a flat grey level 20 * label (JPEG-exact for flat images).
    assert abs(int(ex['image'].mean()) - 20 * int(ex['label'])) <= 1
  assert sources.load('cifar10', 'train', str(tmp_path / 'tfds'), str(src)).num_examples == 20

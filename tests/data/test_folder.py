"""Image-folder datasets, decoding (random-resized crop / centre crop) and
decoding in worker processes."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_folder
from PIL import Image

from pemn_jax.data import decode, sources
from pemn_jax.data.pipeline import Pipeline

CLASSES = ('cat', 'dog', 'emu')


def test_crop_box_follows_the_inception_recipe():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(400):
    w0, h0 = (int(v) for v in rng.integers(20, 400, 2))
    left, top, w, h = decode.crop_box(w0, h0, rng)
    assert 0 <= left and left + w <= w0 and 0 <= top and top + h <= h0 and w > 0 and h > 0
    areas.append(w * h / (w0 * h0))
    aspects.append(w / h)
  # Mostly draws (area 0.08-1, aspect 3/4-4/3, up to rounding), a few fallbacks.
  inside = [0.07 <= a <= 1 and 0.7 <= r <= 1.4 for a, r in zip(areas, aspects, strict=True)]
  assert np.mean(inside) > 0.97 and min(areas) < 0.2 and max(areas) > 0.8
  # A strip no draw fits: the fallback is the centre crop clamped to aspect 4/3.
  assert decode.crop_box(400, 10, np.random.default_rng(1)) == (193, 0, 13, 10)
  assert decode.crop_box(10, 400, np.random.default_rng(1)) == (0, 193, 10, 13)


def test_eval_resize_and_centre_crop():
  # Shorter side -> int(64 / 0.875) = 73; the longer side scales with it.
  assert decode.eval_box(100, 50, 64) == ((146, 73), (41, 4, 105, 68))
  assert decode.eval_box(73, 73, 64) == ((73, 73), (4, 4, 68, 68))
  # A constant image stays constant; the output has the asked shape.
  data = _encode(np.full((50, 100, 3), 77, np.uint8), 'PNG')
  out = decode.decode_one(data, 'x', 64, False, 0, 0, 0)
  assert out.shape == (64, 64, 3) and (out == 77).all()


def _encode(arr, fmt):
  import io
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, fmt)
  return buf.getvalue()


def test_training_decode_is_a_function_of_seed_step_position():
  arr = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
  data = _encode(arr, 'PNG')
  a = decode.decode_one(data, 'x', 32, True, 5, 3, 7)
  assert np.array_equal(a, decode.decode_one(data, 'x', 32, True, 5, 3, 7))
  assert not np.array_equal(a, decode.decode_one(data, 'x', 32, True, 5, 4, 7))
  # A flip is a mirror of the same crop: over many positions both occur.
  flips = [decode.decode_rng(5, 3, p) for p in range(40)]
  coins = []
  for rng in flips:
    decode.crop_box(90, 60, rng)
    coins.append(rng.random() < 0.5)
  assert 5 < sum(coins) < 35


def test_folder_batches_workers_resume_and_labels(tmp_path):
  path = make_folder(tmp_path / 'imgs')
  data_dir = str(tmp_path / 'prepared')
  ds0 = sources.load(f'folder:{path}', 'train', data_dir, image_size=32, workers=0)
  assert ds0.num_examples == 18 and ds0.num_classes == 3 and ds0.image_shape == (32, 32, 3)
  labels_txt = open(os.path.join(os.path.dirname(os.path.dirname(
      ds0.source.dataset_info.data_dir)), 'labels.txt')).read()
  assert labels_txt == '0\tcat\n1\tdog\n2\temu\n'
  batches = {}
  for workers in (0, 1, 2):
    ds = sources.load(f'folder:{path}', 'train', data_dir, image_size=32, workers=workers)
    pipe = Pipeline(ds, 6, seed=3)
    batches[workers] = [pipe.raw_batch(s)[:2] for s in range(4)]
    ds.decoder.close()
  for workers in (1, 2):
    for (a, la), (b, lb) in zip(batches[0], batches[workers], strict=True):
      assert a.dtype == np.uint8 and a.shape == (6, 32, 32, 3)
      assert np.array_equal(a, b) and np.array_equal(la, lb)
  # A resumed pipeline (fresh, asked for step 3 first) gives the same batch.
  fresh = Pipeline(sources.load(f'folder:{path}', 'train', data_dir, image_size=32, workers=0),
                   6, seed=3)
  img, lab, _ = fresh.raw_batch(3)
  assert np.array_equal(img, batches[0][3][0]) and np.array_equal(lab, batches[0][3][1])
  # Labels are the sorted class folders: every example's label matches its file.
  for ex in ds0.source.__getitems__(list(range(ds0.num_examples))):
    name = bytes(ex['name']).decode()
    assert CLASSES[ex['label']] == name.split('/')[0]
  # Evaluation: the val/ sibling, centre crops, padded last batch.
  test = Pipeline(sources.load(f'folder:{path}', 'test', data_dir, image_size=32, workers=0),
                  4, 0, training=False)
  got = list(test.eval_batches())
  assert [len(b[0]) for b in got] == [4, 4] and got[-1][2].tolist() == [1, 1, 0, 0]


def _error(tmp_path, path, match):
  with pytest.raises(sources.DataError, match=match):
    sources.load(f'folder:{path}', 'train', str(tmp_path / 'prepared'), image_size=32,
                 workers=0)


def test_folder_errors_name_the_problem(tmp_path):
  path = make_folder(tmp_path / 'a', (2, 1))
  os.makedirs(os.path.join(path, 'fox'))
  _error(tmp_path, path, r'class folder .*fox has no images')
  os.rmdir(os.path.join(path, 'fox'))
  open(os.path.join(path, 'cat', 'notes.txt'), 'w').write('x')
  _error(tmp_path, path, r'notes.txt is not an image')
  os.remove(os.path.join(path, 'cat', 'notes.txt'))
  open(os.path.join(path, 'cat', 'broken.jpg'), 'wb').write(b'not a jpeg at all')
  _error(tmp_path, path, r'broken.jpg is not a readable image')
  os.remove(os.path.join(path, 'cat', 'broken.jpg'))
  open(os.path.join(path, 'cat', '.DS_Store'), 'w').write('x')  # hidden files are ignored
  sources.load(f'folder:{path}', 'train', str(tmp_path / 'prepared'), image_size=32, workers=0)
  # A changed folder is refused, not silently re-read or ignored.
  _encode_to(os.path.join(path, 'dog', 'new.png'))
  _error(tmp_path, path, r'changed since it was prepared')
  # No evaluation split; an evaluation class the training split lacks.
  lone = make_folder(tmp_path / 'b', (1, 1))
  os.rename(os.path.join(tmp_path, 'b', 'val'), os.path.join(tmp_path, 'b', 'other'))
  _error(tmp_path, lone, r'no evaluation split')
  os.rename(os.path.join(tmp_path, 'b', 'other'), os.path.join(tmp_path, 'b', 'val'))
  os.makedirs(os.path.join(tmp_path, 'b', 'val', 'yak'))
  _encode_to(os.path.join(tmp_path, 'b', 'val', 'yak', '0.png'))
  with pytest.raises(sources.DataError, match=r"classes the training split lacks: \['yak'\]"):
    sources.load(f'folder:{lone}', 'test', str(tmp_path / 'prepared2'), image_size=32)


def _encode_to(path):
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(path)


def test_truncated_image_is_named_at_decode():
  data = _encode(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8), 'JPEG')
  with pytest.raises(decode.DecodeError, match='cat/7.jpg: cannot decode'):
    decode.decode_one(data[:len(data) // 2], 'cat/7.jpg', 32, True, 0, 0, 0)


def test_worker_batches_free_their_shared_blocks():
  """Workers write batches into shared memory: read, failed and dropped
  batches all give their block back, for reuse while the decoder runs and
  freed when it closes (none is left in /dev/shm)."""
  from multiprocessing import shared_memory
  arr = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  good, bad = _encode(arr, 'PNG'), _encode(arr, 'JPEG')[:100]
  source = [{'image': np.frombuffer(good, np.uint8), 'label': 7, 'name': b'a'},
            {'image': np.frombuffer(bad, np.uint8), 'label': 1, 'name': b'cat/1.jpg'}]
  dec = decode.Decoder(16, workers=1)
  try:
    read = dec.submit(source, np.zeros(5, int), True, 1, 2)
    names = [read.block.name]
    expected = np.stack([decode.decode_one(good, 'a', 16, True, 1, 2, p) for p in range(5)])
    images, labels = read.result()
    assert np.array_equal(images, expected) and labels.tolist() == [7] * 5
    failed = dec.submit(source, np.array([0, 1]), False)
    assert failed.block.name == names[0]  # the read batch's block, reused
    dropped = dec.submit(source, np.array([0]), False)  # (a new block: none is spare)
    names.append(dropped.block.name)
    with pytest.raises(decode.DecodeError, match='cat/1.jpg'):
      failed.result()
    del dropped
  finally:
    dec.close()
  assert not dec._dropped
  # A decoder dropped without close() frees its blocks too.
  other = decode.Decoder(16, workers=1)
  other.submit(source, np.array([0]), False).result()
  names.append(other._spare[0].name)
  del other
  gc.collect()
  for name in names:
    with pytest.raises(FileNotFoundError):
      shared_memory.SharedMemory(name=name)
  decode.Decoder(16, workers=1).close()  # (stops the pool it started)


def test_too_little_shared_memory_is_a_clear_error(monkeypatch):
  # (a block larger than /dev/shm's free space would kill the worker writing it)
  monkeypatch.setattr(decode, 'shm_free', lambda: 1000)
  dec = decode.Decoder(16, workers=1)
  with pytest.raises(OSError, match=r'/dev/shm has 0 MiB free .*--shm-size.*data_workers=0'):
    dec.submit([], np.zeros(5, int), True)
  assert not dec._blocks
  assert decode.shm_free() is None or decode.shm_free() > 0


def test_cli_trains_evaluates_and_exports_an_image_folder(tmp_path):
  """2 steps of ResNet-18 (ImageNet-style) at 64 px on a folder of mixed
  sizes; the exported file evaluates to the run's own test accuracy."""
  path = make_folder(tmp_path / 'imgs')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  run = ['--config', f'configs/dense.py:model=resnet18_imagenet,dataset=folder:{path},batch=6',
         '--config.image_size=64', '--config.num_steps=2', '--config.data_workers=2',
         f'--config.data_dir={tmp_path / "prep"}', '--config.eval_batch_size=4',
         '--workdir', str(tmp_path / 'run')]
  trained = subprocess.run([sys.executable, '-m', 'pemn_jax.main', *run], cwd=REPO, env=env,
                           check=True, capture_output=True, text=True, timeout=600)
  # The decoding workers' shared blocks are all freed by exit (before, the
  # batches decoded ahead were left to multiprocessing's leak warning).
  assert 'leaked shared_memory' not in trained.stderr, trained.stderr[-2000:]
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    result = [json.loads(line) for line in f][-1]
  out = tmp_path / 'model.pemn'
  subprocess.run([sys.executable, '-m', 'pemn_jax.export', '--workdir', str(tmp_path / 'run'),
                  '--out', str(out)], cwd=REPO, env=env, check=True, capture_output=True,
                 timeout=600)
  ev = subprocess.run([sys.executable, '-m', 'pemn_jax.evaluate', '--artifact', str(out),
                       '--data_dir', str(tmp_path / 'prep'), '--batch_size', '4'], cwd=REPO,
                      env=env, check=True, capture_output=True, text=True, timeout=600)
  acc = float(ev.stdout.split('accuracy=')[1].split()[0])
  assert math.isclose(acc, result['test_accuracy'], abs_tol=1e-4), (acc, result)
  assert '(6 examples)' in ev.stdout


def test_config_keys_of_variable_size_datasets_are_checked():
  from pemn_jax.config import ConfigError, base_config, validate
  c = base_config()
  c.dataset, c.image_size = 'mnist', 64
  with pytest.raises(ConfigError, match='image_size=64 is invalid: applies to variable-size'):
    validate(c)
  c.dataset = 'folder:/data/x/train'
  validate(c)
  c.image_size, c.data_workers = 4, None
  with pytest.raises(ConfigError, match='image_size=4 is invalid: must be an integer >= 8'):
    validate(c)
  c.image_size, c.data_workers = 64, -1
  with pytest.raises(ConfigError, match='data_workers=-1 is invalid'):
    validate(c)
  c.data_workers, c.dataset = 2, 'folder:'
  with pytest.raises(ConfigError, match="dataset='folder:' is invalid"):
    validate(c)


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220),
           (120, 120, 120)]


def _prepare_fake_imagenet2012(data_dir):
  """A prepared ``imagenet2012`` (TFDS's own builder's features, name and
  version) of solid-colour JPEGs of varied sizes, written without TensorFlow
  (which preparing the real one needs): train 6, validation 4 examples."""
  import io

  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as real

  def jpeg(colour, h, w):
    b = io.BytesIO()
    Image.new('RGB', (w, h), colour).save(b, 'JPEG', quality=95)
    return b.getvalue()

  class Fake(real.Builder, skip_registration=True):
    name = 'imagenet2012'

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=real.Builder(
          data_dir=data_dir + '_none').info.features, supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._examples(range(6)), 'validation': self._examples(range(4), 900)}

    def _examples(self, indices, label0=0):
      for i in indices:  # example i: colour i, label label0 + i, (40+7i) x (70-5i) pixels
        yield str(i), {'file_name': f'{i}.JPEG', 'label': label0 + i,
                       'image': jpeg(COLOURS[i], 40 + 7 * i, 70 - 5 * i)}

  Fake(data_dir=data_dir, file_format='array_record').download_and_prepare()


def test_a_prepared_tfds_imagenet2012_trains_and_evaluates_on_its_validation_split(tmp_path):
  # imagenet2012 has no labelled 'test' split: runs evaluate on 'validation'
  # (before: "tfds:imagenet2012 has no split 'test'" at every run's start).
  data_dir = str(tmp_path / 'tfds')
  _prepare_fake_imagenet2012(data_dir)
  # (a worker process reads the records: the TFDS data source travels to it)
  test = sources.load('tfds:imagenet2012', 'test', data_dir, image_size=16, workers=1)
  assert test.num_examples == 4 and test.num_classes == 1000
  assert test.image_shape == (16, 16, 3)
  try:
    images, labels, weights = next(Pipeline(test, 4, 0, training=False).eval_batches())
  finally:
    test.decoder.close()
  assert sorted(labels.tolist()) == [900, 901, 902, 903] and weights.tolist() == [1, 1, 1, 1]
  for img, label in zip(images, labels, strict=True):  # each its own colour, decoded
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), COLOURS[label - 900], atol=4)
  train = sources.load('tfds:imagenet2012', 'train', data_dir, image_size=16, workers=0)
  img, lab, _ = Pipeline(train, 3, seed=0).raw_batch(0)
  assert img.shape == (3, 16, 16, 3) and img.dtype == np.uint8
  for im, label in zip(img, lab, strict=True):  # random-resized crops of solid colours
    np.testing.assert_allclose(im.reshape(-1, 3).mean(0), COLOURS[label], atol=4)
  from conftest import tiny_config

  from pemn_jax.train.loop import train_and_evaluate
  c = tiny_config({'source_dir': None, 'data_dir': data_dir}, dataset='tfds:imagenet2012',
                  image_size=16, data_workers=0, batch_size=3, eval_batch_size=4, num_steps=2)
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  assert out['step'] == 2 and 0 <= out['test_accuracy'] <= 1

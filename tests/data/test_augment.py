"""Augmentation ops against their definitions (torchvision's RandAugment /
ColorJitter / RandomErasing, written out by hand here)."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from pemn_jax.data import augment as aug


def test_parse_presets_ops_and_errors():
  assert aug.parse('pemn') == ('flip', 'randaugment', 'jitter', 'erase')
  assert aug.parse('cifar') == aug.parse(True) == ('crop', 'flip')
  assert aug.parse('') == aug.parse(False) == ()
  assert aug.parse('erase, flip,flip') == ('flip', 'erase')
  with pytest.raises(ValueError, match="unknown augment op 'cutmix'"):
    aug.parse('flip,cutmix')
  with pytest.raises(ValueError, match='augment'):
    aug.parse(3)


def test_randaugment_magnitudes_at_bin_12_of_31():
  # torchvision: linspace(0, max, 31)[12] = max * 12 / 30; posterize 8 - round(12 / 7.5);
  # solarize linspace(255, 0, 31)[12]; translate max = 150 / 331 * image size.
  expected = {'ShearX': 0.12, 'Rotate': 12.0, 'Brightness': 0.36, 'Sharpness': 0.36,
              'Posterize': 6.0, 'Solarize': 153.0, 'TranslateY': 150 / 331 * 32 * 0.4,
              'Equalize': 0.0}
  for op, m in expected.items():
    assert aug.ra_magnitude(op, 12, 32) == pytest.approx(m), op


def _img(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_randaugment_ops_are_the_pil_operations():
  x = _img()
  pil = Image.fromarray(x)
  out = np.asarray(aug._apply_ra(pil, 'TranslateX', 5.8))  # int(magnitude) = 5 pixels
  np.testing.assert_array_equal(out[:, 5:], x[:, :-5])
  np.testing.assert_array_equal(out[:, :5], 0)
  out = np.asarray(aug._apply_ra(pil, 'ShearX', 0.12))  # about the top-left corner
  np.testing.assert_array_equal(out[0], x[0])
  np.testing.assert_array_equal(np.asarray(aug._apply_ra(pil, 'Posterize', 6)), x & 0b11111100)
  np.testing.assert_array_equal(np.asarray(aug._apply_ra(pil, 'Solarize', 153)),
                                np.where(x >= 153, 255 - x, x))
  np.testing.assert_array_equal(np.asarray(aug._apply_ra(pil, 'Brightness', -0.36)),
                                np.asarray(ImageEnhance.Brightness(pil).enhance(0.64)))
  np.testing.assert_array_equal(np.asarray(aug._apply_ra(pil, 'Equalize', 0)),
                                np.asarray(ImageOps.equalize(pil)))
  np.testing.assert_array_equal(np.asarray(aug._apply_ra(pil, 'Identity', 0)), x)


def test_uint8_ops_are_deterministic_per_image_and_position():
  batch = np.stack([_img(i) for i in range(16)])
  a = aug.augment_uint8(batch, aug.parse('pemn'), seed=1, step=7, positions=range(16))
  b = aug.augment_uint8(batch, aug.parse('pemn'), seed=1, step=7, positions=range(16))
  np.testing.assert_array_equal(a, b)
  # An image's result depends on its global position, not on the rest of the slice.
  half = aug.augment_uint8(batch[8:], aug.parse('pemn'), seed=1, step=7, positions=range(8, 16))
  np.testing.assert_array_equal(half, a[8:])
  c = aug.augment_uint8(batch, aug.parse('pemn'), seed=1, step=8, positions=range(16))
  assert not np.array_equal(a, c)
  assert a.dtype == np.uint8 and a.shape == batch.shape
  # Grayscale images (MNIST) go through the same ops.
  g = aug.augment_uint8(batch[..., :1], aug.parse('randaugment,jitter'), 0, 0, range(16))
  assert g.shape == (16, 32, 32, 1)


def test_flip_and_crop():
  batch = np.stack([_img(i) for i in range(64)])
  out = aug.augment_uint8(batch, ('flip',), 0, 0, range(64))
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, batch)]
  kept = [np.array_equal(o, x) for o, x in zip(out, batch)]
  assert all(f or k for f, k in zip(flipped, kept)) and 15 < sum(flipped) < 49
  out = aug.augment_uint8(batch, ('crop',), 0, 0, range(64))
  for o, x in zip(out, batch):  # a shifted window of the zero-padded image
    padded = np.pad(x, ((4, 4), (4, 4), (0, 0)))
    assert any(np.array_equal(o, padded[dy:dy + 32, dx:dx + 32])
               for dy in range(9) for dx in range(9))


def test_crop_then_flip_follows_each_images_draws():
  """The draws are (dy, dx) then the flip coin, from the image's own
  generator: the batch is what one image at a time gives (kept across
  versions, so augmented runs see the same batches)."""
  batch = np.stack([_img(i) for i in range(20)])[:, :, :30]  # non-square
  out = aug.augment_uint8(batch, ('crop', 'flip'), 3, 11, range(5, 25))
  for k, x in enumerate(batch):
    rng = aug.image_rng(3, 11, 5 + k)
    dy, dx = rng.integers(0, 9, size=2)
    want = np.pad(x, ((4, 4), (4, 4), (0, 0)))[dy:dy + 32, dx:dx + 30]
    if rng.random() < 0.5:
      want = want[:, ::-1]
    np.testing.assert_array_equal(out[k], want)
  with pytest.raises(ValueError, match='20 images but 3 positions'):
    aug.augment_uint8(batch, ('crop', 'flip'), 3, 11, range(3))


def test_random_erasing_matches_its_definition():
  x = np.full((400, 32, 32, 3), 200, np.uint8)
  boxes = aug.erase_boxes(400, (32, 32, 3), seed=0, step=0, positions=range(400), p=0.25)
  out = aug.normalize(x, np.float32([0.0] * 3), np.float32([1.0] * 3), boxes)
  erased = [(o == 0).any() for o in out]
  assert 70 < sum(erased) < 130  # p = 0.25 of 400
  for o in out:
    zero = (o[..., 0] == 0)
    if zero.any():
      rows, cols = np.where(zero.any(1))[0], np.where(zero.any(0))[0]
      h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
      assert zero.sum() == h * w  # one rectangle, all channels
      assert (o[zero] == 0).all()
      assert 0.02 * 1024 * 0.8 <= h * w <= 0.33 * 1024 * 1.2
      assert 0.3 / 1.5 <= h / w <= 3.3 * 1.5


def test_normalizing_on_device_gives_the_host_bits():
  # The trainer ships uint8 and normalizes inside the jitted step: the same
  # float32 operations as the host's, so the same bits, erase boxes included.
  import jax
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (64, 12, 10, 3), dtype=np.uint8)
  mean, std = np.float32([0.4914, 0.4822, 0.4465]), np.float32([0.2470, 0.2435, 0.2616])
  boxes = aug.erase_boxes(64, x.shape[1:], seed=1, step=7, positions=range(64), p=0.5)
  assert (boxes[:, 1] > boxes[:, 0]).sum() > 10
  want = ((x.astype(np.float32) / np.float32(255)) - mean) / std  # the definition
  for k, (i0, i1, j0, j1) in enumerate(boxes):
    want[k, i0:i1, j0:j1] = 0.0
  host = aug.normalize(x, mean, std, boxes)
  device = jax.jit(lambda a, b: aug.normalize(a, mean, std, b))(x, boxes)
  np.testing.assert_array_equal(host, want)
  np.testing.assert_array_equal(np.asarray(device), want)

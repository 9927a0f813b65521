"""Training-time image augmentation in numpy/PIL (no TensorFlow, no torch).

``config.augment`` is a comma-separated list of ops, applied in this order:

* ``crop``: random crop with 4-pixel zero padding (the CIFAR standard);
* ``flip``: horizontal flip with probability 0.5;
* ``randaugment``: RandAugment (Cubuk et al.) as torchvision implements it:
  ``ra_ops`` ops drawn uniformly from its 14 (Identity, ShearX/Y, TranslateX/Y,
  Rotate, Brightness, Color, Contrast, Sharpness, Posterize, Solarize,
  AutoContrast, Equalize), each at magnitude bin ``ra_magnitude`` of 31 with a
  random sign, nearest-neighbour resampling, zero fill;
* ``jitter``: ColorJitter(brightness, contrast, saturation = ``jitter``) in a
  random order (torchvision's);
* ``erase``: RandomErasing(p=``erase``, scale (0.02, 0.33), ratio (0.3, 3.3),
  value 0) on the *normalized* image, as torchvision applies it after
  ``Normalize`` (``erase_boxes`` draws the boxes, ``normalize`` zeroes them).

Presets: ``cifar`` = crop,flip; ``pemn`` = flip,randaugment,jitter,erase (the
PEMN reference's CIFAR pipeline: its RandomResizedCrop(scale=1, ratio=1) is the
identity). Every random draw comes from a generator seeded by (seed, step,
position in the global batch), so a batch is a pure function of (seed, step)
and each process augments only its own slice.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

OPS = ('crop', 'flip', 'randaugment', 'jitter', 'erase')
PRESETS = {'cifar': ('crop', 'flip'), 'pemn': ('flip', 'randaugment', 'jitter', 'erase')}
RA_OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
          'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize')
RA_BINS = 31
DEFAULTS = {'ra_ops': 2, 'ra_magnitude': 12, 'jitter': 0.2, 'erase': 0.2}


def parse(spec) -> tuple[str, ...]:
  """``config.augment`` (a string, or a bool for older configs) -> op names.

  Raises:
    ValueError: naming an unknown op.
  """
  if isinstance(spec, bool):
    return PRESETS['cifar'] if spec else ()
  if not isinstance(spec, str):
    raise ValueError(f'augment must be a string of ops {OPS} or a preset {sorted(PRESETS)}, '
                     f'got {spec!r}')
  ops = []
  for item in (s.strip() for s in spec.split(',') if s.strip()):
    if item in PRESETS:
      ops.extend(PRESETS[item])
    elif item in OPS:
      ops.append(item)
    else:
      raise ValueError(f'unknown augment op {item!r}; ops: {OPS}, presets: {sorted(PRESETS)}')
  return tuple(o for o in OPS if o in ops)  # canonical order, no duplicates


def ra_magnitude(op: str, magnitude_bin: int, size: int) -> float:
  """torchvision RandAugment's (unsigned) magnitude of ``op`` at a bin."""
  frac = magnitude_bin / (RA_BINS - 1)
  linear = {'ShearX': 0.3, 'ShearY': 0.3, 'TranslateX': 150.0 / 331.0 * size,
            'TranslateY': 150.0 / 331.0 * size, 'Rotate': 30.0, 'Brightness': 0.9,
            'Color': 0.9, 'Contrast': 0.9, 'Sharpness': 0.9}
  if op in linear:
    return linear[op] * frac
  if op == 'Posterize':
    return float(8 - int(round(magnitude_bin / ((RA_BINS - 1) / 4))))
  if op == 'Solarize':
    return 255.0 * (1.0 - frac)
  return 0.0


def _signed(op: str) -> bool:
  return op in ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color',
                'Contrast', 'Sharpness')


def _apply_ra(img, op: str, m: float):
  from PIL import Image, ImageEnhance, ImageOps

  nearest = Image.Resampling.NEAREST
  fill = 0 if img.mode == 'L' else (0, 0, 0)
  if op == 'ShearX':  # about the top-left corner, as torchvision's center=[0, 0]
    return img.transform(img.size, Image.Transform.AFFINE, (1, m, 0, 0, 1, 0), nearest,
                         fillcolor=fill)
  if op == 'ShearY':
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, m, 1, 0), nearest,
                         fillcolor=fill)
  if op == 'TranslateX':
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, -int(m), 0, 1, 0), nearest,
                         fillcolor=fill)
  if op == 'TranslateY':
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, -int(m)), nearest,
                         fillcolor=fill)
  if op == 'Rotate':
    return img.rotate(m, nearest, fillcolor=fill)
  if op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    return getattr(ImageEnhance, op)(img).enhance(1.0 + m)
  if op == 'Posterize':
    return ImageOps.posterize(img, int(m))
  if op == 'Solarize':
    return ImageOps.solarize(img, m)
  if op == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if op == 'Equalize':
    return ImageOps.equalize(img)
  return img


def _to_pil(x):
  from PIL import Image
  return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


def _from_pil(img, channels: int):
  a = np.asarray(img, np.uint8)
  return a[..., None] if channels == 1 else a


def image_rng(seed: int, step: int, position: int) -> np.random.Generator:
  """The generator of one image's draws: a pure function of its (seed, step,
  position in the global batch)."""
  return np.random.default_rng([int(seed), 1 << 20, int(step), int(position)])


def _crop_flip_draws(rng, ops) -> tuple[int, int, bool]:
  """An image's crop offsets, then its flip coin, drawn first from its
  generator (in this order: the batches of augmented runs depend on it)."""
  dy, dx = rng.integers(0, 9, size=2) if 'crop' in ops else (0, 0)
  flip = 'flip' in ops and rng.random() < 0.5
  return int(dy), int(dx), bool(flip)


def _crop_flip(images, ops, seed, step, positions):
  """Crop and/or flip only: each image's draws as ``augment_uint8`` makes
  them, then the whole batch in one gather."""
  n, h, w, _ = images.shape
  positions = list(positions)
  if len(positions) != n:
    raise ValueError(f'{n} images but {len(positions)} positions')
  dy, dx, flip = np.zeros(n, np.intp), np.zeros(n, np.intp), np.zeros(n, bool)
  for k, pos in enumerate(positions):
    dy[k], dx[k], flip[k] = _crop_flip_draws(image_rng(seed, step, pos), ops)
  src = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0))) if 'crop' in ops else images
  rows = dy[:, None] + np.arange(h)                             # (n, h)
  cols = dx[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))  # (n, w)
  return src[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment_uint8(images: np.ndarray, ops, seed: int, step: int, positions,
                  options=None) -> np.ndarray:
  """The uint8 ops (everything but ``erase``) on a batch (N, H, W, C).

  Args:
    images: uint8 images of this process's slice.
    ops: op names (``parse``'s output).
    seed, step: the run's seed and the batch's step.
    positions: each image's position in the global batch.
    options: ``ra_ops``, ``ra_magnitude``, ``jitter`` (``DEFAULTS``).
  Returns:
    A new uint8 array of the same shape.
  """
  o = {**DEFAULTS, **(options or {})}
  h, w, ch = images.shape[1:]
  if set(ops) <= {'crop', 'flip'}:
    return _crop_flip(images, ops, seed, step, positions)
  out = np.empty_like(images)
  if 'crop' in ops:  # padded once for the batch (per image: 40% of a crop+flip batch's time)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for k, (img, pos) in enumerate(zip(images, positions, strict=True)):
    rng = image_rng(seed, step, pos)
    dy, dx, flip = _crop_flip_draws(rng, ops)
    if 'crop' in ops:
      img = padded[k, dy:dy + h, dx:dx + w]
    if flip:
      img = img[:, ::-1]
    if 'randaugment' in ops or 'jitter' in ops:
      pil = _to_pil(np.ascontiguousarray(img))
      if 'randaugment' in ops:
        for _ in range(int(o['ra_ops'])):
          op = RA_OPS[rng.integers(len(RA_OPS))]
          m = ra_magnitude(op, int(o['ra_magnitude']), h)
          if _signed(op) and rng.integers(2):
            m = -m
          pil = _apply_ra(pil, op, m)
      if 'jitter' in ops and o['jitter'] > 0:
        from PIL import ImageEnhance
        j = float(o['jitter'])
        for fn in rng.permutation(3):  # brightness, contrast, saturation in random order
          factor = rng.uniform(max(0.0, 1 - j), 1 + j)
          enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[fn]
          if fn == 2 and ch == 1:
            continue
          pil = enhancer(pil).enhance(factor)
      img = _from_pil(pil, ch)
    out[k] = img
  return out


def erase_boxes(n: int, shape, seed: int, step: int, positions, p: float) -> np.ndarray:
  """torchvision's RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3),
  value=0) as boxes: one ``(i0, i1, j0, j1)`` row per image (int32; an empty
  box where nothing is erased). The box is zeroed on the *normalized* image,
  as torchvision applies it after ``Normalize`` (``normalize`` does, on the
  host or in the jitted step)."""
  h, w = shape[:2]
  area, out = h * w, np.zeros((n, 4), np.int32)
  lo, hi = math.log(0.3), math.log(3.3)
  for k, pos in enumerate(positions):
    rng = np.random.default_rng([int(seed), 1 << 21, int(step), int(pos)])
    if rng.random() >= p:
      continue
    for _ in range(10):
      target = area * rng.uniform(0.02, 0.33)
      aspect = math.exp(rng.uniform(lo, hi))
      eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
      if eh < h and ew < w:
        i, j = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
        out[k] = (i, i + eh, j, j + ew)
        break
  return out


def normalize(images, mean, std, boxes=None):
  """``(images / 255 - mean) / std`` in float32 with the erase ``boxes``
  zeroed: numpy on the host, or jax inside a jitted step -- the same bits
  (there, each channel's 256 values are looked up in a table the host
  computed: XLA would rewrite the divisions into multiplications).

  Args:
    images: uint8 (N, H, W, C).
    mean, std: per channel, on the 0..1 scale (float32).
    boxes: None, or (N, 4) int32 ``(i0, i1, j0, j1)`` from ``erase_boxes``.
  Returns:
    float32 (N, H, W, C).
  """
  if isinstance(images, np.ndarray):  # in place: the same float32 operations, no temporaries
    xp, x = np, images.astype(np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
  else:
    levels = np.arange(256, dtype=np.uint8)[:, None]
    table = normalize(np.repeat(levels, np.size(mean), 1), mean, std)  # (256, C)
    xp, x = jnp, jnp.asarray(table)[images.astype(jnp.int32), np.arange(table.shape[1])]
  if boxes is None:
    return x
  rows = xp.arange(x.shape[1])[None, :, None]
  cols = xp.arange(x.shape[2])[None, None, :]
  b = boxes[:, :, None, None]
  inside = (rows >= b[:, 0]) & (rows < b[:, 1]) & (cols >= b[:, 2]) & (cols < b[:, 3])
  return xp.where(inside[..., None], xp.float32(0.0), x)

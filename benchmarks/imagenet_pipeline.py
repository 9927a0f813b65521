"""ImageNet-style input: pemn_jax's image-folder pipeline vs a PyTorch
``DataLoader`` doing the same work, at the same worker counts, in one run.

Used by ``benchmarks/input_pipeline.py --imagenet``. A folder of variable-size
JPEGs is made from CIFAR-10's (``../shared/data/cifar10_jpeg/train.tar.gz``),
each resized to random 200-500 px sides (bicubic, quality 90). Both sides then
produce training batches at 224 px: decode, Inception random-resized crop
(area 0.08-1, aspect 3/4-4/3), bilinear resize, flip, normalize to float32
(torch: its ``ToTensor`` + ``Normalize`` written here as tensor ops, since
torchvision does not import beside torch on this machine, in its workers;
pemn_jax: the batch its trainer consumes, uint8, normalized inside the jitted
step on the device -- and, for comparison, ``Pipeline.batch``, normalized on
the host by the main process). PyTorch reads the JPEG files; pemn_jax reads its prepared
array_record copy of the same bytes (prepared once, not timed).
"""

from __future__ import annotations

import io
import math
import os
import random
import tarfile
import time

import numpy as np

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_folder(root: str, n: int, seed: int = 0, tar_path=None) -> str:
  """``root/train/<class>/*.jpg`` (+ ``root/val``): ``n`` CIFAR-10 images
  resized to random 200-500 px sides. Returns the train folder."""
  from PIL import Image
  tar_path = tar_path or os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                                      'cifar10_jpeg', 'train.tar.gz')
  rng = np.random.default_rng(seed)
  made = 0
  with tarfile.open(tar_path, 'r:gz') as tar:
    for member in tar:
      if made >= n + 10:
        break
      if not member.isfile() or not member.name.endswith('.jpg'):
        continue
      split = 'val' if made >= n else 'train'
      cls = member.name.split('/')[-2]
      img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB')
      w, h = (int(v) for v in rng.integers(200, 501, 2))
      out = os.path.join(root, split, cls)
      os.makedirs(out, exist_ok=True)
      img.resize((w, h), Image.BICUBIC).save(os.path.join(out, f'{made}.jpg'), quality=90)
      made += 1
  return os.path.join(root, 'train')


def pemn_jax_rate(folder: str, data_dir: str, workers: int, batch: int, steps: int,
                  normalize: bool = False) -> float:
  """Images/s of pemn_jax's training batches (after one warm-up batch):
  ``raw_batch`` (uint8, what the trainer ships; its jitted step normalizes on
  the device) or, with ``normalize``, ``batch`` (float32 normalized on the host)."""
  from pemn_jax.data import sources
  from pemn_jax.data.pipeline import Pipeline
  ds = sources.load(f'folder:{folder}', 'train', data_dir, image_size=224, workers=workers)
  pipe = Pipeline(ds, batch, seed=0)
  get = pipe.batch if normalize else (lambda s: pipe.raw_batch(s)[:2])
  try:
    get(0)  # starts the workers
    t = time.perf_counter()
    for s in range(1, steps + 1):
      images, _ = get(s % pipe.steps_per_epoch)
    assert images.shape == (batch, 224, 224, 3)
    assert images.dtype == (np.float32 if normalize else np.uint8)
    return steps * batch / (time.perf_counter() - t)
  finally:
    pipe.close()


class TorchFolder:
  """torchvision's ImageFolder + RandomResizedCrop(224) + RandomHorizontalFlip
  + ToTensor + Normalize, written with PIL and torch."""

  def __init__(self, root: str):
    classes = sorted(os.listdir(root))
    self.items = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                  for f in sorted(os.listdir(os.path.join(root, c)))]

  def __len__(self):
    return len(self.items)

  @staticmethod
  def crop_params(width, height):
    area = width * height
    for _ in range(10):
      target = area * random.uniform(0.08, 1.0)
      aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
      w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
      if 0 < w <= width and 0 < h <= height:
        return random.randint(0, width - w), random.randint(0, height - h), w, h
    ratio = width / height
    w, h = ((width, round(width / (3 / 4))) if ratio < 3 / 4 else
            (round(height * 4 / 3), height) if ratio > 4 / 3 else (width, height))
    return (width - w) // 2, (height - h) // 2, w, h

  def __getitem__(self, i):
    import torch
    from PIL import Image
    path, label = self.items[i]
    with open(path, 'rb') as f:
      img = Image.open(f).convert('RGB')
    left, top, w, h = self.crop_params(*img.size)
    img = img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
    if random.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return x, label


def torch_rate(folder: str, workers: int, batch: int, steps: int) -> float:
  """Images/s of a torch DataLoader (shuffled, ``workers`` processes)."""
  import torch
  torch.set_num_threads(1)
  loader = torch.utils.data.DataLoader(TorchFolder(folder), batch_size=batch, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=True)
  it = iter(loader)
  next(it)  # warm-up: the workers start
  t = time.perf_counter()
  for _ in range(steps):
    try:
      x, _ = next(it)
    except StopIteration:  # a new epoch (the folder holds at least steps + 1 batches)
      it = iter(loader)
      x, _ = next(it)
  assert x.shape == (batch, 3, 224, 224)
  rate = steps * batch / (time.perf_counter() - t)
  del it, loader
  return rate

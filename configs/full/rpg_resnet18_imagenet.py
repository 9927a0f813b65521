"""RPG ResNet-18 on ImageNet at the reference code's settings.

Reference (samaonline/Recurrent-Parameter-Generators, main.py + README): arch
``superresnet18e`` (torchvision's ResNet-18; stage convolutions generated from
one ring, stem and classifier ordinary), ring of ``512*512*3*3`` = 2,359,296
floats (its ``mem_size`` default), SGD momentum 0.9, weight decay 1e-4, lr 0.1
decayed as ``0.1 ** (epoch / 45)`` (``--ed 45``), 90 epochs, batch 512 (its
README command), RandomResizedCrop(224) + flip; evaluation Resize(256) +
CenterCrop(224). The paper reports 96% of ResNet-18's accuracy with 18% of
its DoF (torchvision's ResNet-18: 69.76% top-1; so about 67%); not
reproduced here (no accelerator).

Expects 8 devices (the reference's 8 GPUs; a TPU v4-8 / v5e-8 host), data
parallel. Step cost and per-device memory: ``python benchmarks/fullscale.py``
(docs/fullscale.md); estimated time: see the table there.

    python -m pemn_jax.main --config configs/full/rpg_resnet18_imagenet.py --config.data_dir=<tfds_data_dir> --workdir /tmp/rpg18
    python -m pemn_jax.main --config configs/full/rpg_resnet18_imagenet.py:dataset=folder:/data/imagenet/train --workdir /tmp/rpg18
"""

import os

from pemn_jax.sweep.spec import load_config

DEVICES = 8


def get_config(arg=None):
  """Arguments: dataset, epochs, batch, dof, depth (18; 34: rpg_resnet34_imagenet.py)."""
  from pemn_jax.config import ConfigError, parse_arg
  a = parse_arg(arg, dataset='tfds:imagenet2012', epochs=90.0, batch=512, dof=2_359_296.0,
                depth=18)
  if a.depth not in (18, 34):
    raise ConfigError(f'config argument depth={a.depth}: RPG\'s reference has ResNet-18 and 34')
  here = os.path.dirname(os.path.abspath(__file__))
  c = load_config(os.path.join(here, '..', 'rpg.py'), {
      'dof': a.dof, 'model': 'resnet18_imagenet' if a.depth == 18 else 'resnet34',
      'dataset': a.dataset, 'epochs': a.epochs, 'batch': a.batch, 'lr': 0.1,
      'decay_epochs': 45.0, 'generate': '@stages'})
  c.image_size = 224
  c.augment = ''
  c.eval_batch_size = 1000
  c.eval_every = 5000
  c.checkpoint_every = 2500
  return c

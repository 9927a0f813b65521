"""PEMN ConvMixer-256/8 on CIFAR-10 at the reference code's settings.

Reference (yueb17/PEMN, src/convmixer/train.py, options.py and the README's
command): ConvMixer hdim 256, depth 8 (options.py's default; the README's
command uses depth 6: ``depth=6``), kernel 5, patch 2, GELU, masks keeping
50% per layer on frozen RP prototype weights (``--clone_type augment
--MP_RP_ratio 0.001``), AdamW lr 0.05, weight decay 0.005, one-cycle
schedule, batch 512, 100 epochs, augmentation RandAugment(2, 12) + flip +
ColorJitter 0.2 + RandomErasing 0.2 (``scale=1.0``: no crop). The reference
reports the best test accuracy over epochs (the trainer logs best and final).
The paper's CIFAR-10 figures are not transcribed here; this library's short
runs of the same recipe are in docs/fidelity.md (not this paper-scale run).

Expects 1 device (the reference's single GPU); step cost, memory and estimated
time: ``python benchmarks/fullscale.py`` (docs/fullscale.md).

    python -m pemn_jax.main --config configs/full/pemn_convmixer_cifar10.py --workdir /tmp/pemn_cm
"""

import os

from pemn_jax.sweep.spec import load_config

DEVICES = 1


def get_config(arg=None):
  """Arguments: dataset, epochs, batch, mode, ratio, keep, depth."""
  from pemn_jax.config import parse_arg
  a = parse_arg(arg, dataset='cifar10', epochs=100.0, batch=512, mode='rp', ratio=1e-3,
                keep=0.5, depth=8)
  here = os.path.dirname(os.path.abspath(__file__))
  return load_config(os.path.join(here, '..', 'pemn.py'), {
      'mode': a.mode, 'ratio': a.ratio, 'keep': a.keep, 'model': f'convmixer_256_{a.depth}',
      'dataset': a.dataset, 'epochs': a.epochs, 'batch': a.batch, 'lr': 0.05})

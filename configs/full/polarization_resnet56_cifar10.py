"""Polarization gating of ResNet-56 on CIFAR-10 at 50% sparsity.

The paper (arXiv 2302.10798) removes 50% of ResNet-56's connections in one
training pass at less than 1 point of CIFAR-10 accuracy, training 200
epochs. Its code is not public: the optimizer here is this library's dense
preset for batch-norm networks (SGD lr 0.1, momentum 0.9, weight decay 5e-4,
cosine, batch 128), the gates and regularizer as docs/polarization.md
describes; CIFAR crop + flip. Not reproduced here (no accelerator).

Expects 1 device; step cost, memory and estimated time:
``python benchmarks/fullscale.py`` (docs/fullscale.md).

    python -m pemn_jax.main --config configs/full/polarization_resnet56_cifar10.py --workdir /tmp/pol56
    python -m pemn_jax.export --workdir /tmp/pol56 --out /tmp/pol56.pemn --slice
"""

import os

from pemn_jax.sweep.spec import load_config

DEVICES = 1


def get_config(arg=None):
  """Arguments: dataset, epochs, batch, sparsity."""
  from pemn_jax.config import parse_arg
  a = parse_arg(arg, dataset='cifar10', epochs=200.0, batch=128, sparsity=0.5)
  here = os.path.dirname(os.path.abspath(__file__))
  return load_config(os.path.join(here, '..', 'polarization.py'), {
      'model': 'resnet56', 'dataset': a.dataset, 'sparsity': a.sparsity, 'epochs': a.epochs,
      'batch': a.batch})

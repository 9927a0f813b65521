"""PEMN: frozen prototype weights (OL / MP / RP) + learned per-layer masks.

As the reference code (yueb17/PEMN, src/convmixer): AdamW lr 0.05, weight decay
0.005 (scores and batch-norm affine params alike), one-cycle schedule (0 -> lr
at 40% -> lr/20 at 80% -> 0), edge-popup masks keeping k per layer (first and
last layers included, kept count n - int((1 - k) n)), batch-norm affine params
trained, prototypes never rescaled per layer (``rescale`` unset: off on
batch-norm models, where it changes nothing; see below), ConvMixer
without biases, batch 512, CIFAR augmentation flip + RandAugment(2, 12) +
ColorJitter 0.2 + RandomErasing 0.2 (``augment='pemn'``). The reference reports
the best test accuracy over epochs: the trainer logs both best and final.
Differences: float32 instead of mixed precision; ``mode`` names: clone = ol,
augment with ratio 1 = mp, augment with ratio < 1 = rp (``permute=true`` is
its ``MP_RP_mode=rand``); on models without batch norm (mlp, lenet5, vit),
which the reference does not have, ``rescale`` unset gives each layer its own
Kaiming std: without it the layers after the largest one start too small and
RP 1e-3 on the MNIST MLP drops from ~93.7% to ~91.6% (docs/fidelity.md).

    python -m pemn_jax.main --config configs/pemn.py:mode=rp,ratio=1e-3 --workdir /tmp/pemn
    python -m pemn_jax.main --config configs/pemn.py:mode=mp,model=convmixer_256_8,dataset=cifar10,epochs=100,batch=512 --workdir /tmp/cm
"""

from pemn_jax.config import Unset, base_config, dataset_defaults, parse_arg, uses_batch_norm


def get_config(arg=None):
  a = parse_arg(arg, mode='rp', ratio=1e-3, keep=0.5, permute=False, rescale=Unset(bool),
                model='lenet5', dataset='fashion_mnist', epochs=10.0, batch=128, lr=0.05)
  c = base_config()
  dataset_defaults(c, a.dataset)
  if c.augment:  # CIFAR: the reference's pipeline
    c.augment = 'pemn'
  c.model = a.model
  if a.model.startswith('convmixer'):
    c.model_kwargs.use_bias = False
  rescale = not uses_batch_norm(c) if a.rescale is None else a.rescale
  c.param = {'name': 'masked', 'keep': a.keep,
             'source': {'name': 'prototype', 'mode': a.mode, 'ratio': a.ratio,
                        'permute': a.permute, 'rescale': rescale, 'rest': 'train'}}
  c.optimizer.update(name='adamw', lr=a.lr, weight_decay=5e-3, schedule='onecycle')
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

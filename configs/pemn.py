"""PEMN: frozen prototype weights (OL / MP / RP) + learned per-layer masks.

Paper settings: AdamW lr 0.05, weight decay 0.005 (scores included), one-cycle
schedule (0 -> lr at 40% -> lr/20 at 80% -> 0), masks keep k per layer, norm
affine params trained.

    python -m pemn_jax.main --config configs/pemn.py:mode=rp,ratio=1e-3 --workdir /tmp/pemn
    python -m pemn_jax.main --config configs/pemn.py:mode=mp,model=convmixer_256_8,dataset=cifar10,epochs=100,batch=512 --workdir /tmp/cm
"""

from pemn_jax.config import base_config, dataset_defaults, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, mode='rp', ratio=1e-3, keep=0.5, permute=False, rescale=True,
                model='lenet5', dataset='fashion_mnist', epochs=10.0, batch=128, lr=0.05)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  c.param = {'name': 'masked', 'keep': a.keep,
             'source': {'name': 'prototype', 'mode': a.mode, 'ratio': a.ratio,
                        'permute': a.permute, 'rescale': a.rescale, 'rest': 'train'}}
  c.optimizer.update(name='adamw', lr=a.lr, weight_decay=5e-3, schedule='onecycle')
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

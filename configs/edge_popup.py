"""Edge-popup / supermask baseline: dense random frozen weights + learned masks.

Paper settings (edge-popup): SGD momentum 0.9, lr 0.1, weight decay 5e-4,
cosine schedule; norm layers not affine-trained (fixed).

    python -m pemn_jax.main --config configs/edge_popup.py:model=resnet20,dataset=cifar10 --workdir /tmp/ep
    python -m pemn_jax.main --config configs/edge_popup.py:kind=supermask --workdir /tmp/sm
"""

from pemn_jax.config import base_config, dataset_defaults, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, kind='edge_popup', keep=0.5, model='lenet5', dataset='fashion_mnist',
                epochs=10.0, batch=128, lr=0.1)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  c.param = {'name': 'masked', 'keep': a.keep, 'kind': a.kind,
             'source': {'name': 'prototype', 'mode': 'dense', 'rest': 'fixed'}}
  c.optimizer.update(name='sgd', lr=a.lr, momentum=0.9, weight_decay=5e-4, schedule='cosine')
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

"""Edge-popup / supermask baselines: frozen random weights + learned masks.

Reference (allenai/hidden-networks): weights ``signed_constant`` (+-sqrt(2 /
fan_in), its headline setting; ``weights=dense`` for Kaiming normal), every
conv/linear layer masked, batch norm non-affine (``rest='fixed'``), SGD momentum
0.9, cosine schedule, batch 128.

* edge-popup (``kind=edge_popup``): top-k of |scores| per layer, lr 0.1,
  weight decay 1e-4 on the scores (its fc/conv2-8 configs; resnet18: 5e-4).
* supermask (``kind=supermask``): Bernoulli(sigmoid(score)) masks, evaluated
  with a sampled mask as the reference does (``eval=sample``; ``threshold``:
  p > 0.5; ``expected``: average of ``eval_samples`` sampled networks); its
  batch-128 configs use lr 200 (conv2-6; 400 resnet18, 800 conv8) and no
  weight decay.

    python -m pemn_jax.main --config configs/edge_popup.py:model=resnet20,dataset=cifar10 --workdir /tmp/ep
    python -m pemn_jax.main --config configs/edge_popup.py:kind=supermask --workdir /tmp/sm
"""

from pemn_jax.config import Unset, base_config, dataset_defaults, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, kind='edge_popup', keep=0.5, model='lenet5', dataset='fashion_mnist',
                epochs=10.0, batch=128, lr=Unset(float), wd=Unset(float), weights='signed_constant',
                eval='sample', eval_samples=8)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  source = {'name': 'prototype', 'mode': a.weights, 'rest': 'fixed'}
  c.param = {'name': 'masked', 'keep': a.keep, 'kind': a.kind, 'source': source}
  if a.kind == 'supermask':
    c.param.update(eval=a.eval, eval_samples=a.eval_samples)
  supermask = a.kind == 'supermask'
  lr = (200.0 if supermask else 0.1) if a.lr is None else a.lr
  wd = a.wd if a.wd is not None else (0.0 if supermask else 1e-4)
  c.optimizer.update(name='sgd', lr=lr, momentum=0.9, weight_decay=wd, schedule='cosine')
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

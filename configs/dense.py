"""Dense baseline: every parameter trained.

    python -m pemn_jax.main --config configs/dense.py:model=resnet20,dataset=cifar10 --workdir /tmp/dense
"""

from pemn_jax.config import base_config, dataset_defaults, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, model='lenet5', dataset='fashion_mnist', epochs=10.0, batch=128, lr=0.1)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  c.param = {'name': 'dense'}
  c.optimizer.update(name='sgd', lr=a.lr, momentum=0.9, weight_decay=5e-4, schedule='cosine')
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

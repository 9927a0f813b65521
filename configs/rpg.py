"""RPG: a trainable ring of D floats generates every kernel.

Paper settings: SGD momentum 0.9, weight decay 1e-4, cosine schedule; norm
params trained normally. dof: a count (>= 1) or a fraction of N.

    python -m pemn_jax.main --config configs/rpg.py:dof=0.01,model=resnet20,dataset=cifar10 --workdir /tmp/rpg
"""

from pemn_jax.config import base_config, dataset_defaults, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, dof=0.01, model='lenet5', dataset='fashion_mnist', epochs=10.0, batch=128,
                lr=0.1, mask=0.0)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  ring = {'name': 'ring', 'dof': a.dof, 'rest': 'train'}
  c.param = {'name': 'masked', 'keep': a.mask, 'source': ring} if a.mask else ring
  c.optimizer.update(name='sgd', lr=a.lr, momentum=0.9, weight_decay=1e-4, schedule='cosine')
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

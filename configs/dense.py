"""Dense baseline: every parameter trained.

SGD momentum 0.9, weight decay 5e-4, cosine schedule; lr 0.1 on batch-norm
models (ResNets, ConvMixer) and 0.01 on models without batch norm (mlp,
lenet5, vit), where 0.1 diverges (LeNet-5 on MNIST: 11% at lr 0.1, 98.2% at
0.01 after 2 epochs).

    python -m pemn_jax.main --config configs/dense.py:model=resnet20,dataset=cifar10 --workdir /tmp/dense
    python -m pemn_jax.main --config configs/dense.py:model=lenet5,dataset=mnist,prune=magnitude,sparsity=0.9 --workdir /tmp/pruned
"""

from pemn_jax.config import base_config, dataset_defaults, parse_arg
from pemn_jax.models import uses_batch_norm


def get_config(arg=None):
  a = parse_arg(arg, model='lenet5', dataset='fashion_mnist', epochs=10.0, batch=128, lr=0.0,
                prune='', sparsity=0.9, allocation='global', skip_first=True)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  c.param = {'name': 'dense'}
  lr = a.lr or (0.1 if uses_batch_norm(a.model) else 0.01)
  c.optimizer.update(name='sgd', lr=lr, momentum=0.9, weight_decay=5e-4, schedule='cosine')
  # Pruning baselines (pemn_jax/train/pruning.py): magnitude = train -> prune
  # at half the run -> fine-tune (Han et al.); gmp = Zhu & Gupta.
  c.prune.update(criterion=a.prune, sparsity=a.sparsity, allocation=a.allocation,
                 skip_first=a.skip_first)
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

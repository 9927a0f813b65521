"""Dense baseline: every parameter trained.

Batch-norm models (ResNets, ConvMixer): SGD lr 0.1, momentum 0.9, weight decay
5e-4, cosine. Models without batch norm (mlp, lenet5, vit): AdamW lr 5e-3,
weight decay 1e-4, one-cycle -- no single SGD lr trains both of them well
(MNIST, 3 epochs: MLP 98.0% at SGD 0.1 but 96.7% at 0.01; LeNet-5 diverges at
0.1 (11%)); AdamW 5e-3: MLP 98.0%, LeNet-5 98.8% (2e-3: 97.9%, 98.4%).

    python -m pemn_jax.main --config configs/dense.py:model=resnet20,dataset=cifar10 --workdir /tmp/dense
    python -m pemn_jax.main --config configs/dense.py:model=lenet5,dataset=mnist,prune=magnitude,sparsity=0.9 --workdir /tmp/pruned
"""

from pemn_jax.config import Unset, base_config, dataset_defaults, parse_arg, uses_batch_norm


def get_config(arg=None):
  a = parse_arg(arg, model='lenet5', dataset='fashion_mnist', epochs=10.0, batch=128, lr=Unset(float),
                prune='', sparsity=0.9, allocation='global', skip_first=True)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  c.param = {'name': 'dense'}
  if uses_batch_norm(c):
    c.optimizer.update(name='sgd', lr=0.1 if a.lr is None else a.lr, momentum=0.9, weight_decay=5e-4,
                       schedule='cosine')
  else:
    c.optimizer.update(name='adamw', lr=5e-3 if a.lr is None else a.lr, weight_decay=1e-4, schedule='onecycle')
  # Pruning baselines (pemn_jax/train/pruning.py): magnitude = train -> prune
  # at half the run -> fine-tune (Han et al.); gmp = Zhu & Gupta.
  c.prune.update(criterion=a.prune, sparsity=a.sparsity, allocation=a.allocation,
                 skip_first=a.skip_first)
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

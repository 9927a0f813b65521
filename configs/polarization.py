"""Polarization gating: one training pass finds a sub-network of user-set
sparsity (fraction of kernel weights removed), then it is sliced physically.

Gates (``model_kwargs.gates``) on hidden units / channels and residual
branches (pemn_jax/gating/modules.py); the polarization regularizer and its
ramp in pemn_jax/gating/param.py; weights train as the dense preset does.

    python -m pemn_jax.main --config configs/polarization.py:model=resnet20,dataset=cifar10,sparsity=0.5 --workdir /tmp/pol
    python -m pemn_jax.main --config configs/polarization.py:model=mlp,dataset=mnist,sparsity=0.7 --workdir /tmp/pol_mlp
    python -m pemn_jax.export --workdir /tmp/pol_mlp --out /tmp/pol_mlp.pemn --slice
"""

from pemn_jax.config import Unset, base_config, dataset_defaults, parse_arg, uses_batch_norm


def get_config(arg=None):
  a = parse_arg(arg, model='lenet5', dataset='fashion_mnist', sparsity=0.5, epochs=10.0,
                batch=128, lr=Unset(float), strength=1.0, budget=100.0, polarize=3.0, warmup=0.1,
                ramp=0.3)
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  c.model_kwargs.gates = True
  c.param = {'name': 'gated', 'sparsity': a.sparsity, 'strength': a.strength,
             'budget': a.budget, 'polarize': a.polarize, 'warmup': a.warmup, 'ramp': a.ramp,
             'source': {'name': 'dense'}}
  if uses_batch_norm(c):
    c.optimizer.update(name='sgd', lr=0.1 if a.lr is None else a.lr, momentum=0.9, weight_decay=5e-4,
                       schedule='cosine')
  else:
    c.optimizer.update(name='adamw', lr=5e-3 if a.lr is None else a.lr, weight_decay=1e-4, schedule='onecycle')
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

"""The main job: a PEMN network on Fashion-MNIST in minutes on 2 CPU cores.

An MLP (784-300-100-10) whose weights are never trained: they are a random
vector of int(N_max * 1e-3) + 1 = 236 floats tiled over every layer (PEMN RP),
and a learned 50% top-k mask per layer (edge-popup scores, straight-through).

    python -m pemn_jax.main --config configs/quickstart.py --workdir /tmp/quickstart

Same model trained dense, same budget:
    python -m pemn_jax.main --config configs/quickstart.py:dense=true --workdir /tmp/qs_dense
"""

from pemn_jax.config import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, dense=False, epochs=30.0, ratio=1e-3, keep=0.5)
  c = base_config()
  c.dataset = 'fashion_mnist'
  c.model = 'mlp'
  c.model_kwargs.hidden = (300, 100)
  if a.dense:
    c.param = {'name': 'dense'}
    c.optimizer.update(name='adamw', lr=2e-3, weight_decay=1e-4, schedule='onecycle')
  else:
    # rescale: each layer at its own Kaiming std (the PEMN preset's choice for
    # models without batch norm; see configs/pemn.py).
    c.param = {'name': 'masked', 'keep': a.keep,
               'source': {'name': 'prototype', 'mode': 'rp', 'ratio': a.ratio, 'rescale': True}}
    c.optimizer.update(name='adamw', lr=0.05, weight_decay=5e-3, schedule='onecycle')
  c.batch_size = 128
  c.num_epochs = a.epochs
  c.log_every = 500
  c.eval_every = 2000
  c.checkpoint_every = 2000
  return c

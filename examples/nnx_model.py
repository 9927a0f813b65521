"""Your own Flax NNX model as a PEMN network: trained, exported, evaluated.

An NNX CNN (with BatchNorm) on MNIST whose weights are never trained: a random
prototype of int(N_max * 1e-3) + 1 floats tiled over every kernel (PEMN RP)
and learned 50% masks; norm params train. The few lines that matter are in
``main``: the model goes in as an import path (``config.model``), every
parameterization, the trainer, checkpoints and model files work as with Linen.

    python examples/nnx_model.py --steps 300

Last line: nnx test_accuracy=<a> file_bytes=<n> dense_bytes=<m>
"""

from __future__ import annotations

import argparse
import os
import tempfile

from flax import linen as nn
from flax import nnx


class CNN(nnx.Module):
  """conv16 - pool - conv32 - BN - pool - linear, for 28x28x1 images."""

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(32 * 7 * 7, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nn.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nn.max_pool(nnx.relu(self.bn(self.conv2(x))), (2, 2), (2, 2))
    return self.head(x.reshape((x.shape[0], -1)))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--steps', type=int, default=300)
  ap.add_argument('--workdir', default='', help='default: a temporary directory')
  ap.add_argument('--smoke', action='store_true', help='5 steps on a slice (checks the script)')
  args = ap.parse_args()

  from pemn_jax.config import base_config
  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.export.model_file import export_run
  from pemn_jax.train.loop import train_and_evaluate

  c = base_config()
  c.dataset = 'mnist'
  c.model = 'nnx_model:CNN'  # this file's class, by import path (its directory is on sys.path)
  c.param = {'name': 'masked', 'keep': 0.5,
             'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3, 'rescale': True}}
  c.optimizer.update(name='adamw', lr=0.05, weight_decay=5e-3, schedule='onecycle')
  c.num_steps = 5 if args.smoke else args.steps
  c.log_every = 50
  if args.smoke:
    c.train_limit, c.test_limit = 512, 500
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or os.path.join(tmp, 'run')
    run = train_and_evaluate(c, workdir)
    path = os.path.join(tmp, 'nnx.pemn')
    export_run(workdir, path, params_dir=None)
    # A file made with a user model loads only when the caller passes the model.
    ev = evaluate_artifact(path, model=CNN)
    assert abs(ev['accuracy'] - run['test_accuracy']) < 1e-6 or args.smoke
    print(f'nnx test_accuracy={ev["accuracy"]:.4f} file_bytes={os.path.getsize(path)} '
          f'dense_bytes={run["dense_bytes"]}')


if __name__ == '__main__':
  main()

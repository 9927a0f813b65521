"""Edge-popup ResNet-50 on ImageNet with signed-constant weights, 30% kept.

Reference (allenai/hidden-networks,
configs/largescale/subnetonly/resnet50-usc-unsigned.yaml, the README's 68.6%
top-1 row): torchvision's ResNet-50, every convolution and the classifier
masked (``SubnetConv``, top 30% of |scores| per layer), weights the unscaled
signed constant +-sqrt(2 / fan_in), batch norm without affine parameters
(``rest='fixed'``: this library's classifier bias is fixed at zero, the
reference's 1x1-conv classifier has none), SGD lr 0.256, momentum 0.875,
weight decay 3.0517578125e-5, cosine schedule with 5 warmup epochs, label
smoothing 0.1, 100 epochs, batch 256, RandomResizedCrop(224) + flip;
evaluation Resize(256) + CenterCrop(224). The README's number is 68.6% top-1;
not reproduced here (no accelerator).

Expects 8 devices, data parallel; step cost, memory and estimated time:
``python benchmarks/fullscale.py`` (docs/fullscale.md).

    python -m pemn_jax.main --config configs/full/edge_popup_resnet50_imagenet.py --config.data_dir=<tfds_data_dir> --workdir /tmp/ep50
    python -m pemn_jax.main --config configs/full/edge_popup_resnet50_imagenet.py:dataset=folder:/data/imagenet/train --workdir /tmp/ep50
"""

import os

from pemn_jax.sweep.spec import load_config

DEVICES = 8


def get_config(arg=None):
  """Arguments: dataset, epochs, batch, keep."""
  from pemn_jax.config import parse_arg
  a = parse_arg(arg, dataset='tfds:imagenet2012', epochs=100.0, batch=256, keep=0.3)
  here = os.path.dirname(os.path.abspath(__file__))
  c = load_config(os.path.join(here, '..', 'edge_popup.py'), {
      'kind': 'edge_popup', 'keep': a.keep, 'model': 'resnet50', 'dataset': a.dataset,
      'epochs': a.epochs, 'batch': a.batch, 'lr': 0.256, 'wd': 0.000030517578125,
      'weights': 'signed_constant'})
  c.optimizer.update(momentum=0.875, schedule='cosine')
  # 5 warmup epochs (the reference's warmup_length), in steps of this batch.
  c.optimizer.warmup_steps = int(5 * 1_281_167 // a.batch)
  c.label_smoothing = 0.1
  c.image_size = 224
  c.eval_batch_size = 1000
  c.eval_every = 5000
  c.checkpoint_every = 2500
  return c

"""RPG: a trainable ring of D floats generates the network's kernels.

Reference (samaonline/Recurrent-Parameter-Generators): the stage convolutions
and 1x1 shortcuts are generated, the stem and the classifier are ordinary
trained parameters (``generate='@stages'``); ring std sqrt(2/4608), per-layer
constants giving Kaiming fan-out variance; one global random permutation of the
index multiset cut into layers; SGD momentum 0.9, weight decay 1e-4, lr 0.1
decayed 10x every ``decay_epochs`` epochs (continuously per epoch, as
``lr * 0.1 ** (epoch / ed)``). dof: a count (>= 1) or a fraction of N.

``generate`` (default): ``'@stages'`` as the reference, unless the stem and
the classifier hold more than half of the kernel weights -- an MLP, whose
first layer is 88% of them (it would stay float32 and the file 1.1x smaller)
-- then ``'@kernels'``: the ring carries every kernel. Measured, MLP on MNIST,
dof 0.01, 3 epochs: ``@stages`` 97.91%, 958,106-byte file; ``@kernels``
94.44%, 13,129 bytes (81x smaller than the dense params). ResNets, ConvMixer,
LeNet-5 and ViT keep ``@stages`` (its share: 98-99.9% of their kernel weights).

    python -m pemn_jax.main --config configs/rpg.py:dof=0.01,model=resnet20,dataset=cifar10 --workdir /tmp/rpg
    python -m pemn_jax.main --config configs/rpg.py:model=mlp,dataset=mnist --workdir /tmp/rpg_mlp

Models without batch norm (mlp, lenet5, vit): SGD diverges there, at 0.1 and
on LeNet-5 even at 0.003 (every ring entry sums the gradients of ~T/D weights
with random signs, layer constants c_i^2 = var_i / ring_std^2 reach ~50 for
small layers, and no normalization absorbs the growth), so their preset is
AdamW (lr ``lr_no_bn`` = 3e-3, cosine): Adam's per-entry step moves every layer
by the same *relative* amount whatever its constant. Measured on MNIST in
docs/fidelity.md.
"""

from pemn_jax.config import (
    Unset,
    base_config,
    dataset_defaults,
    parse_arg,
    selected_share,
    uses_batch_norm,
)


def get_config(arg=None):
  a = parse_arg(arg, dof=0.01, model='lenet5', dataset='fashion_mnist', epochs=10.0, batch=128,
                lr=0.1, lr_no_bn=3e-3, decay_epochs=Unset(float), generate=Unset(str),
                mask=Unset(float))
  c = base_config()
  dataset_defaults(c, a.dataset)
  c.model = a.model
  generate = a.generate
  if generate is None:  # the reference's split, unless it would leave most weights outside
    generate = '@stages' if selected_share(c, '@stages') >= 0.5 else '@kernels'
  ring = {'name': 'ring', 'dof': a.dof, 'rest': 'train', 'select': generate, 'fan': 'out',
          'ring_std': (2 / 4608) ** 0.5, 'assign': 'global'}
  c.param = {'name': 'masked', 'keep': a.mask, 'source': ring} if a.mask is not None else ring
  if not uses_batch_norm(c):
    c.optimizer.update(name='adamw', lr=a.lr_no_bn, weight_decay=1e-4, schedule='cosine')
  else:
    # Reference: lr * 0.1 ** (epoch / 45) over 90 epochs; here the same shape
    # over the run: 10x down every decay_epochs (default: half the run).
    c.optimizer.update(name='sgd', lr=a.lr, momentum=0.9, weight_decay=1e-4,
                       schedule='exponential', decay_epochs=a.epochs / 2 if a.decay_epochs is None else a.decay_epochs)
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.eval_every = 2000
  return c

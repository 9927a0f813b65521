"""Every model works with every parameterization.

Every named full-size model x every parameterization is traced end to end
with ``jax.eval_shape`` (init, forward, backward, optimizer update) without
compiling. Reduced sizes of each model class compile and take a real gradient
step: every parameterization on the MLP and a ResNet, and every model class
with the dense baseline and the two deepest compositions (parameterizations
only see a params dict, so the tracing covers the rest of the cross product).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config
from flax import traverse_util

from pemn_jax import models
from pemn_jax import params as param_lib
from pemn_jax.pytrees import flatten
from pemn_jax.train import create_train_state, make_train_step

SPECS = {
    'dense': {'name': 'dense'},
    'ring': {'name': 'ring', 'dof': 0.05},
    'ol': {'name': 'prototype', 'mode': 'ol'},
    'edge_popup': {'name': 'masked', 'keep': 0.5,
                   'source': {'name': 'prototype', 'mode': 'dense', 'rest': 'fixed'}},
    'pemn_mp': {'name': 'masked', 'keep': 0.5, 'source': {'name': 'prototype', 'mode': 'mp'}},
    'pemn_rp': {'name': 'masked', 'keep': 0.5,
                'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-3, 'permute': True}},
    'ring_mask': {'name': 'masked', 'keep': 0.5, 'source': {'name': 'ring', 'dof': 0.05}},
    'supermask': {'name': 'masked', 'kind': 'supermask'},
}

SMALL = {
    'mlp': (dict(hidden=(32, 16)), (8, 8, 1)),
    'lenet5': ({}, (28, 28, 1)),
    'resnet': (dict(stage_sizes=(1, 1), widths=(4, 8)), (8, 8, 3)),
    'resnet_bottleneck': (dict(stage_sizes=(1, 1), widths=(4, 8), stem='imagenet',
                               bottleneck=True), (8, 8, 3)),
    'convmixer': (dict(dim=16, depth=2, kernel_size=3, patch_size=2), (8, 8, 3)),
    'vit': (dict(dim=16, depth=2, num_heads=2, mlp_dim=32), (8, 8, 3)),
}

FULL = {'mlp': (28, 28, 1), 'lenet5': (28, 28, 1), 'resnet8': (32, 32, 3), 'resnet20': (32, 32, 3),
        'resnet32': (32, 32, 3), 'resnet56': (32, 32, 3), 'resnet18': (32, 32, 3),
        'convmixer_256_6': (32, 32, 3), 'convmixer_256_8': (32, 32, 3), 'vit': (32, 32, 3)}


def setup(name, kwargs, shape, spec, batch=4, abstract=False):
  if name.startswith('resnet') and name in SMALL:  # the class behind every ResNet, smallest
    model = models.ResNet(num_classes=10, **kwargs)
  else:
    model = models.get(name, num_classes=10, **kwargs)
  param = param_lib.build(spec, models.abstract_params(model, shape))
  tx = optax.adam(1e-2)
  def make():
    model_state = models.init_model_state(model, shape)
    ts = create_train_state(param, tx, jax.random.key(0), model_state, seed=3)
    return ts, jax.random.normal(jax.random.key(1), (batch, *shape)), jnp.arange(batch) % 10

  ts, images, labels = jax.eval_shape(make) if abstract else make()
  return model, param, ts, make_train_step(model, param, tx), images, labels


EXECUTED = sorted({(m, s) for m in ('mlp', 'resnet') for s in SPECS} |
                  {(m, s) for m in SMALL for s in ('dense', 'pemn_rp', 'ring_mask')
                   if m != 'resnet_bottleneck' or s == 'dense'})


@pytest.mark.parametrize('name,spec', EXECUTED)
def test_small_model_takes_a_gradient_step(name, spec):
  kwargs, shape = SMALL[name]
  model, param, ts, step, images, labels = setup(name, kwargs, shape, SPECS[spec])
  new_ts, metrics = jax.jit(step)(ts, images, labels, jax.random.key(2))
  assert np.isfinite(float(metrics['loss']))
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(ts.state), jax.tree.leaves(new_ts.state))]
  assert changed and any(changed)
  # Materialized params match the model's own shapes exactly.
  got = jax.tree.map(lambda x: (x.shape, x.dtype),
                     jax.eval_shape(param.materialize, new_ts.state, ts.seed))
  want = jax.tree.map(lambda x: (x.shape, x.dtype), param.target)
  assert got == want


@pytest.mark.parametrize('spec', list(SPECS))
@pytest.mark.parametrize('name', list(FULL))
def test_full_size_model_traces(name, spec):
  model, param, ts, step, images, labels = setup(name, {}, FULL[name], SPECS[spec], batch=2,
                                                 abstract=True)
  out_ts, metrics = jax.eval_shape(step, ts, images, labels, jax.random.key(2))
  assert metrics['loss'].shape == ()
  assert jax.tree.map(lambda x: x.shape, out_ts.state) == jax.tree.map(lambda x: x.shape, ts.state)


def test_standard_parameter_counts():
  counts = {n: param_lib.Dense(models.abstract_params(models.get(n), s)).num_params
            for n, s in FULL.items()}
  assert counts['resnet20'] == 272_474
  assert counts['resnet56'] == 855_770
  assert counts['resnet18'] == 11_173_962
  assert counts['lenet5'] == 61_706


@pytest.mark.parametrize('size', [3, 4, 5])
@pytest.mark.parametrize('impl', ['shift', 'onednn'])
def test_depthwise_equals_xla(impl, size):
  """The CPU depthwise convolutions (shifted multiply-adds with their own
  gradient; oneDNN's grouped convolution) against XLA's grouped convolution:
  values and both gradients, odd and even kernels."""
  from pemn_jax.kernels import conv, dnnl_conv
  if impl == 'onednn' and not dnnl_conv.available():
    pytest.skip('oneDNN convolutions unavailable here')
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 6))
  mod = models.DepthwiseConv(size, impl='xla')
  v = mod.init(jax.random.key(1), x)
  kernel = v['params']['kernel']
  fns = {'xla': lambda x, k: mod.apply({'params': {'kernel': k, 'bias': v['params']['bias']}}, x)
         - v['params']['bias'],
         'shift': conv.shifted_depthwise_conv,
         'onednn': lambda x, k: conv.depthwise_conv(x, k, impl='onednn')}
  g = jax.random.normal(jax.random.key(2), x.shape)
  want, want_vjp = jax.vjp(fns['xla'], x, kernel)
  got, got_vjp = jax.vjp(jax.jit(fns[impl]), x, kernel)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_depthwise_module_impls_agree():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
  mods = {impl: models.DepthwiseConv(5, impl=impl) for impl in ('shift', 'auto', 'xla')}
  v = mods['xla'].init(jax.random.key(1), x)
  for impl in ('shift', 'auto'):
    np.testing.assert_allclose(np.asarray(mods[impl].apply(v, x)),
                               np.asarray(mods['xla'].apply(v, x)), rtol=1e-5, atol=1e-5)


def test_unknown_model():
  with pytest.raises(ValueError, match='unknown model'):
    models.get('alexnet')


def test_convmixer_biases_are_an_option_and_pemn_has_none():
  with_b = models.abstract_params(models.get('convmixer', dim=16, depth=2), (32, 32, 3))
  without = models.abstract_params(models.get('convmixer', dim=16, depth=2, use_bias=False),
                                   (32, 32, 3))
  assert any(p.endswith('bias') and 'BatchNorm' not in p for p in flatten(with_b))
  assert [p for p in flatten(without) if p.endswith('bias') and 'BatchNorm' not in p] == []
  assert load_config('pemn', 'model=convmixer_256_6').model_kwargs.use_bias is False


def test_abstract_params_come_in_creation_order():
  target = models.abstract_params(models.get('resnet20'), (32, 32, 3))
  order = list(traverse_util.flatten_dict(target, sep='/'))
  kernels = [p for p in order if p.endswith('kernel')]
  assert kernels[0] == 'Conv_0/kernel' and kernels[-1] == 'Dense_0/kernel'
  assert kernels[1] == 'BasicBlock_0/Conv_0/kernel'


def torchvision_resnet_shapes(depth):
  """torchvision.models.resnet{18,34,50}(num_classes=1000)'s parameter shapes,
  in torch's layouts (conv OIHW, linear (out, in)), written from its
  definition: conv1 7x7, layers of BasicBlock (expansion 1) or Bottleneck
  (expansion 4, stride on conv2), a 1x1 conv + BN downsample where the
  stride or width changes, fc."""
  blocks, expansion = {18: ((2, 2, 2, 2), 1), 34: ((3, 4, 6, 3), 1),
                       50: ((3, 4, 6, 3), 4)}[depth]
  shapes = [(64, 3, 7, 7), (64,), (64,)]
  inplanes = 64
  for i, n in enumerate(blocks):
    planes = 64 * 2**i
    for b in range(n):
      stride = 2 if i > 0 and b == 0 else 1
      if expansion == 1:
        shapes += [(planes, inplanes, 3, 3), (planes,), (planes,),
                   (planes, planes, 3, 3), (planes,), (planes,)]
      else:
        shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                   (planes, planes, 3, 3), (planes,), (planes,),
                   (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
      if stride != 1 or inplanes != planes * expansion:
        shapes += [(planes * expansion, inplanes, 1, 1), (planes * expansion,),
                   (planes * expansion,)]
      inplanes = planes * expansion
  return shapes + [(1000, inplanes), (1000,)]


@pytest.mark.parametrize('depth,name', [(18, 'resnet18_imagenet'), (34, 'resnet34'),
                                        (50, 'resnet50')])
def test_imagenet_resnets_match_torchvision_layer_for_layer(depth, name):
  def to_flax(shape):  # OIHW -> HWIO, (out, in) -> (in, out)
    return (*shape[2:], shape[1], shape[0]) if len(shape) == 4 else tuple(reversed(shape))
  want = sorted(to_flax(s) for s in torchvision_resnet_shapes(depth))
  params = models.abstract_params(models.get(name, num_classes=1000), (224, 224, 3))
  got = sorted(tuple(x.shape) for x in flatten(params).values())
  assert got == want
  assert sum(int(np.prod(s)) for s in got) == {18: 11_689_512, 34: 21_797_672,
                                               50: 25_557_032}[depth]
  # The stem downsamples by 4 (7x7/2 conv + 3x3/2 max pool), the stages by 8 more.
  model = models.get(name, num_classes=1000)
  variables = {'params': params, **models.abstract_variables(model, (224, 224, 3))}
  out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert out.shape == (2, 1000)

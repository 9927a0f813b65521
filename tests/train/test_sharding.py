"""Meshes, regex sharding rules, per-device generation (bitwise the same
params; the compiled HLO works on per-device slices), FSDP state."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

from pemn_jax import params as param_lib
from pemn_jax.config import ConfigError, base_config, validate
from pemn_jax.train import sharding as S


class FakeMesh:
  """Only ``.shape`` is read by ``spec_for``."""

  def __init__(self, **shape):
    self.shape = shape


def spec(name, shape, rules, **mesh):
  return S.spec_for(name, shape, S.parse_rules(rules), FakeMesh(**({'data': 1, 'fsdp': 1} | mesh)))


def test_fsdp_rule_splits_the_largest_divisible_dimension():
  P = jax.sharding.PartitionSpec
  assert spec('state/Dense_0/kernel', (784, 300), 'fsdp', fsdp=4) == P('fsdp', None)
  assert spec('k', (3, 3, 64, 128), 'fsdp', fsdp=4) == P(None, None, None, 'fsdp')
  # 300 is not divisible by 8: the next largest dimension that is.
  assert spec('k', (300, 16), 'fsdp', fsdp=8) == P(None, 'fsdp')
  assert spec('bias', (10,), 'fsdp', fsdp=4) == P()          # nothing divisible: replicated
  assert spec('step', (), 'fsdp', fsdp=4) == P()             # scalars: replicated
  assert spec('k', (784, 300), 'fsdp', fsdp=1) == P()        # a size-1 axis: replicated
  assert spec('k', (784, 300), 'replicated', fsdp=4) == P()


def test_rules_match_in_order_and_explicit_specs_are_checked():
  P = jax.sharding.PartitionSpec
  rules = [('.*/scores/.*', 'fsdp'), ('.*kernel', (None, 'data')), ('.*', 'replicated')]
  assert spec('state/scores/Dense_0/kernel', (784, 300), rules, fsdp=2) == P('fsdp', None)
  assert spec('state/rest/Dense_0/kernel', (784, 300), rules, data=4) == P(None, 'data')
  assert spec('state/rest/Dense_0/bias', (300,), rules, data=4) == P()
  assert spec('opt_state/0/mu/Dense_0/kernel', (8, 8), [('.*', (('data', 'fsdp'),))],
              data=2, fsdp=2) == P(('data', 'fsdp'))
  with pytest.raises(S.ShardingError, match=r'Dense_0/kernel of shape \(784, 300\) cannot be '
                                            r'split.*dimension 1 \(300\) is not divisible by 8'):
    spec('state/rest/Dense_0/kernel', (784, 300), rules, data=8)
  with pytest.raises(S.ShardingError, match='has 3 entries'):
    spec('b', (4,), [('.*', (None, None, 'data'))])
  for bad, msg in [('fsdpp', 'must be one of'), ([('(', 'fsdp')], 'bad regex'),
                   ([('.*', 'model')], 'must be one of'), ([('.*', ('model',))], 'not a mesh axis'),
                   ([('.*',)], r'\(regex, rule\) pair')]:
    with pytest.raises(S.ShardingError, match=msg):
      S.parse_rules(bad)


def test_mesh_shapes():
  assert S.mesh_shape({'data': -1, 'fsdp': 1}, 8) == {'data': 8, 'fsdp': 1}
  assert S.mesh_shape({'data': 2, 'fsdp': -1}, 8) == {'data': 2, 'fsdp': 4}
  assert S.mesh_shape({'data': 2, 'fsdp': 4}, 8) == {'data': 2, 'fsdp': 4}
  for cfg, n, msg in [({'data': 3, 'fsdp': -1}, 8, 'cannot be split'),
                      ({'data': 2, 'fsdp': 2}, 8, 'spans 4 devices, but there are 8'),
                      ({'data': -1, 'fsdp': -1}, 8, 'only one axis'),
                      ({'data': 0}, 8, 'integer >= 1'), ({'model': 2}, 8, 'unknown axes')]:
    with pytest.raises(S.ShardingError, match=msg):
      S.mesh_shape(cfg, n)


def test_config_validation_names_the_sharding_key():
  c = base_config()
  c.sharding.state = 'zero3'
  with pytest.raises(ConfigError, match=r"config.sharding.state='zero3'"):
    validate(c)
  c = base_config()
  c.sharding.generate = 'sometimes'
  with pytest.raises(ConfigError, match='config.sharding.generate'):
    validate(c)
  c = base_config()
  c.mesh.fsdp = 0
  with pytest.raises(ConfigError, match='config.mesh.fsdp=0'):
    validate(c)
  c = base_config()
  c.sharding.state = [('.*scores.*', 'fsdp'), ('.*', 'replicated')]
  c.mesh.fsdp, c.mesh.data = -1, 1
  validate(c)


def test_bytes_per_device_of_a_sharded_tree():
  mesh = jax.sharding.Mesh(jax.devices()[:1], ('x',))
  tree = {'a': jax.ShapeDtypeStruct((10, 4), 'float32'), 'b': jax.ShapeDtypeStruct((3,), 'int8')}
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  assert S.bytes_per_device(tree, {'a': shard, 'b': shard}) == 10 * 4 * 4 + 3


MULTI_DEVICE_CHECKS = r'''
import math, re, sys
import jax, jax.numpy as jnp, numpy as np, optax
from pemn_jax import models, params as param_lib
from pemn_jax.train.sharding import Layout, make_mesh
from pemn_jax.train.step import create_train_state, make_train_step
assert jax.device_count() == 4, jax.device_count()

model = models.get('mlp', num_classes=10, hidden=(64, 32))
shape = (28, 28, 1)
target = models.abstract_params(model, shape)
SPECS = {
  'ring_global': {'name': 'ring', 'dof': 0.02},
  'ring_window': {'name': 'ring', 'dof': 0.02, 'assign': 'window'},
  'pemn_rp': {'name': 'masked', 'keep': 0.3,
              'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-2, 'permute': True}},
  'pemn_mp': {'name': 'masked', 'keep': 0.5, 'source': {'name': 'prototype', 'mode': 'mp'}},
  'edge_popup': {'name': 'masked', 'keep': 0.5,
                 'source': {'name': 'prototype', 'mode': 'dense', 'rest': 'fixed'}},
  'supermask': {'name': 'masked', 'kind': 'supermask',
                'source': {'name': 'prototype', 'mode': 'signed_constant', 'rest': 'fixed'}},
  'rpg_masked': {'name': 'masked', 'keep': 0.5, 'source': {'name': 'ring', 'dof': 0.05}},
  'dense': {'name': 'dense'},
}
LAYOUTS = {
  'data_parallel': Layout(make_mesh({'data': -1, 'fsdp': 1}), 'replicated', 'replicated',
                          'sharded'),
  'fsdp': Layout(make_mesh({'data': 1, 'fsdp': -1}), 'fsdp', 'fsdp', 'sharded'),
  'mixed': Layout(make_mesh({'data': 2, 'fsdp': 2}), 'fsdp', 'replicated', 'sharded'),
}
failures = []
for name, spec in SPECS.items():
  param = param_lib.build(spec, target, model=model, total_steps=10)
  state = param.init(jax.random.key(1))
  seed, rng = jnp.uint32(7), jax.random.key(3)
  weights = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape),
                         jax.eval_shape(param.materialize, state, seed))
  def objective(st, mat):
    out = mat(st)
    return sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(out), jax.tree.leaves(weights)))
  # Only the supermask samples with the rng; for the others rng=None is the
  # same program (one compile per layout saved).
  for with_rng in (False, True) if name == 'supermask' else (False,):
    r = rng if with_rng else None
    # Params and gradients from one program per layout (one compile, not two).
    def params_and_grad(mat):
      return jax.jit(lambda s: (mat(s), jax.grad(lambda x: objective(x, mat))(s)))
    plain, g_plain = params_and_grad(lambda s: param.materialize(s, seed, r))(state)
    for lname, layout in LAYOUTS.items():
      sh = layout.state_shardings(state)
      st = jax.device_put(state, sh)
      out, g = params_and_grad(lambda s: layout.materialize(param, s, seed, r))(st)
      for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(out)):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
          failures.append(f'{name}/{lname}/rng={with_rng}: params differ')
      for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g)):
        # Sums over devices add in another order: equal up to float rounding.
        a, b = np.asarray(a), np.asarray(b)
        err = float(np.max(np.abs(a - b))) / max(1e-30, float(np.max(np.abs(a))))
        if not err < 1e-5:
          failures.append(f'{name}/{lname}/rng={with_rng}: grads differ (relative {err:.2g})')

# The compiled train step of RPG: generation works on per-device slices.
param = param_lib.build({'name': 'ring', 'dof': 0.02}, target, model=model, total_steps=10)
T = param.num_generated
tx = optax.adam(1e-3)
def compiled(layout):
  abstract = jax.eval_shape(lambda k: create_train_state(param, tx, k, {}, 0), jax.random.key(0))
  sh = layout.state_shardings(abstract)
  args = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, sh),
          jax.ShapeDtypeStruct((32, *shape), jnp.float32, sharding=layout.batch),
          jax.ShapeDtypeStruct((32,), jnp.int32, sharding=layout.batch),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=layout.replicated))
  step = jax.jit(make_train_step(model, param, tx, layout.materialize),
                 in_shardings=(sh, layout.batch, layout.batch, layout.replicated),
                 out_shardings=(sh, layout.replicated))
  return step.lower(*args).compile()
def int_arrays(text, n):
  return len(re.findall(rf'[us]32\[{n}(,1)?\]', text))
mesh4 = make_mesh({'data': -1, 'fsdp': 1})
sharded = compiled(Layout(mesh4, 'replicated', 'replicated', 'sharded'))
replicated = compiled(Layout(mesh4, 'replicated', 'replicated', 'replicated'))
local = math.ceil(T / 4)
hs, hr = sharded.as_text(), replicated.as_text()
print(f'T={T} sharded: u32/s32[T] arrays {int_arrays(hs, T)}, [T/4] {int_arrays(hs, local)}; '
      f'replicated: [T] {int_arrays(hr, T)}, [T/4] {int_arrays(hr, local)}')
if int_arrays(hs, T) or not int_arrays(hs, local):
  failures.append('sharded generation: the HLO still has index arrays of all T elements')
if not int_arrays(hr, T):
  failures.append('replicated generation: expected full-size index arrays (the check is blind)')
if not re.search(rf'= \(u32\[{local}\][^\n]*\) while\(', hs):
  failures.append('sharded generation: no per-device permutation (cycle-walk) loop')
ms, mr = sharded.memory_analysis(), replicated.memory_analysis()
print(f'temp bytes per device: sharded {ms.temp_size_in_bytes}, replicated {mr.temp_size_in_bytes}')
if not ms.temp_size_in_bytes < mr.temp_size_in_bytes:
  failures.append('sharded generation does not lower per-device temporaries')

# FSDP: the state is split; each device holds a quarter of a big leaf.
layout = Layout(make_mesh({'data': 1, 'fsdp': -1}), 'fsdp', 'fsdp', 'sharded')
dparam = param_lib.build({'name': 'dense'}, target, model=model, total_steps=10)
abstract = jax.eval_shape(lambda k: create_train_state(dparam, tx, k, {}, 0), jax.random.key(0))
sh = layout.state_shardings(abstract)
ts = jax.jit(lambda k: create_train_state(dparam, tx, k, {}, 0),
             out_shardings=sh)(jax.random.key(0))
k = ts.state['Dense_0']['kernel']
mu = ts.opt_state[0].mu['Dense_0']['kernel']
print('fsdp kernel', k.shape, k.sharding.spec, k.addressable_shards[0].data.shape)
if (k.addressable_shards[0].data.shape != (784 // 4, 64)
    or mu.addressable_shards[0].data.shape != (196, 64)):
  failures.append(f'fsdp: kernel shard {k.addressable_shards[0].data.shape}')
print('\n'.join(failures) or 'all checks passed')
sys.exit(1 if failures else 0)
'''


def test_generation_on_four_devices_is_exact_and_per_device():
  """In a 4-CPU-device process: every method's params are bitwise the same
  generated per device (data parallel, FSDP, 2x2) as on one device, with the
  same gradients; the compiled RPG step holds no index array of all T
  elements when generation is sharded (and does when it is not); FSDP state
  leaves are split four ways."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='4', XLA_FLAGS='')
  r = subprocess.run([sys.executable, '-c', MULTI_DEVICE_CHECKS], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  assert 'all checks passed' in r.stdout


def test_auto_generation_follows_the_size_of_the_trained_state():
  """'auto' shards generation where the state is small next to the params
  (RPG), not where it is as large (PEMN's scores), and never on one device."""
  target = {'Dense_0': {'kernel': jax.ShapeDtypeStruct((64, 32), jnp.float32),
                        'bias': jax.ShapeDtypeStruct((32,), jnp.float32)}}
  ring = param_lib.build({'name': 'ring', 'dof': 0.1}, target, total_steps=10)
  pemn = param_lib.build({'name': 'masked', 'keep': 0.5,
                  'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 0.01}},
                 target, total_steps=10)
  assert 2 * ring.num_trainable() < ring.num_params <= pemn.num_trainable()
  mesh = S.make_mesh({'data': -1, 'fsdp': 1})
  assert S.Layout(mesh, generate='auto').resolve(ring).sharded_generation == (mesh.size > 1)
  assert not S.Layout(mesh, generate='auto').resolve(pemn).sharded_generation
  assert S.Layout(mesh, generate='sharded').resolve(pemn).sharded_generation == True  # noqa: E712
  assert not S.Layout(mesh, generate='replicated').resolve(ring).sharded_generation


def test_layout_on_one_device_changes_nothing():
  layout = S.Layout(S.make_mesh(), 'replicated', 'replicated', 'auto')
  assert layout.flat is None and not layout.sharded_generation
  assert math.prod(layout.mesh.shape.values()) == jax.device_count()

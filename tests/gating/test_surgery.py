"""Physical slicing: the sliced model computes what the gated one does, has the
predicted number of parameters, and refuses gates that cut every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import models
from pemn_jax.gating.surgery import SliceError, open_gates, slice_params
from pemn_jax.pytrees import flatten, unflatten

CASES = {'mlp': ({'hidden': (20, 12)}, (28, 28, 1)),
         'lenet5': ({}, (28, 28, 1)),
         'resnet20': ({'width': 4}, (32, 32, 3)),
         'convmixer': ({'dim': 16, 'depth': 3}, (32, 32, 3)),
         'vit': ({'dim': 24, 'depth': 2, 'num_heads': 3, 'mlp_dim': 16}, (32, 32, 3))}


def predicted_params(model, params) -> int:
  """Parameters the sliced model should have, counted from the gates alone:
  each leaf's size times the open fraction of every gated axis."""
  structure = model.gate_structure()
  gates = open_gates(params, structure)
  total = 0
  for path, leaf in flatten(params).items():
    if path in structure.gates:
      continue
    n = np.asarray(leaf).size
    for f in structure.leaves.get(path, []):
      g = gates[f.gate]
      n = n * (float(g[0]) if f.axis is None else f.expand(g, leaf.shape[f.axis]).mean())
    total += int(round(n))
  return total


def random_gates(name, seed):
  kw, shape = CASES[name]
  model = models.get(name, gates=True, **kw)
  v = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *shape)))
  rng = np.random.default_rng(seed)
  params = flatten(v['params'])
  structure = model.gate_structure()
  branches = 0
  for g, kind in structure.gates.items():
    x = (rng.random(params[g].shape) > 0.45).astype(np.float32)
    if kind == 'channel':
      x.flat[0] = 1.0
    else:  # the first branch closed, the others at random
      x.flat[0] = float(branches > 0 and rng.random() > 0.3)
      branches += 1
    params[g] = jnp.asarray(x)
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype),
                       {k: t for k, t in v.items() if k != 'params'})
  return model, unflatten(params), stats, kw, shape


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('seed', [0, 1])
def test_sliced_model_computes_the_same_function_with_the_predicted_size(name, seed):
  model, params, stats, kw, shape = random_gates(name, seed)
  x = jax.random.normal(jax.random.key(seed + 7), (5, *shape))
  want = model.apply({'params': params, **stats}, x)
  new, new_kw, new_params, new_stats = slice_params(name, dict(kw, gates=True), 10, shape,
                                                    params, stats)
  got = new.apply({'params': new_params, **new_stats}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  n_sliced = sum(np.asarray(a).size for a in jax.tree.leaves(new_params))
  assert n_sliced == predicted_params(model, params)
  n_gated = sum(np.asarray(a).size for k, a in flatten(params).items() if not k.endswith('gate'))
  assert n_sliced < n_gated
  # An ordinary model again: no gates, built by the registry from its kwargs.
  assert new_kw['gates'] is False
  assert set(flatten(models.abstract_params(models.get(name, **new_kw), shape))) == set(
      flatten(new_params))


def test_mlp_and_lenet_sizes_by_hand():
  _, params, stats, kw, shape = random_gates('mlp', 3)
  h1 = int(np.asarray(params['Gate_0']['gate']).sum())
  h2 = int(np.asarray(params['Gate_1']['gate']).sum())
  _, new_kw, new_params, _ = slice_params('mlp', dict(kw, gates=True), 10, shape, params)
  assert new_kw['hidden'] == (h1, h2)
  assert sum(np.asarray(a).size for a in jax.tree.leaves(new_params)) == (
      784 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10)
  _, params, _, kw, shape = random_gates('lenet5', 4)
  c1, c2, f1, f2 = (int(np.asarray(params[f'Gate_{i}']['gate']).sum()) for i in range(4))
  _, new_kw, new_params, _ = slice_params('lenet5', dict(kw, gates=True), 10, shape, params)
  assert tuple(new_kw['widths']) == (c1, c2, f1, f2)
  assert sum(np.asarray(a).size for a in jax.tree.leaves(new_params)) == (
      25 * c1 + c1 + 25 * c1 * c2 + c2 + 25 * c2 * f1 + f1 + f1 * f2 + f2 + f2 * 10 + 10)


def test_a_closed_residual_branch_disappears_and_one_without_channels_too():
  model, params, stats, kw, shape = random_gates('resnet20', 5)
  flat = flatten(params)
  flat['BasicBlock_1/Gate_1/gate'] = jnp.zeros(1)  # branch gate closed
  flat['BasicBlock_2/Gate_1/gate'] = jnp.ones(1)
  flat['BasicBlock_2/Gate_0/gate'] = jnp.zeros_like(flat['BasicBlock_2/Gate_0/gate'])  # all
  params = unflatten(flat)
  x = jax.random.normal(jax.random.key(0), (3, *shape))
  new, new_kw, new_params, new_stats = slice_params('resnet20', dict(kw, gates=True), 10, shape,
                                                    params, stats)
  assert new_kw['block_widths'][1] == 0 and new_kw['block_widths'][2] == 0
  assert 'BasicBlock_1' not in new_params and 'BasicBlock_2' not in new_params  # no projection
  np.testing.assert_allclose(np.asarray(new.apply({'params': new_params, **new_stats}, x)),
                             np.asarray(model.apply({'params': params, **stats}, x)),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name,gate', [('mlp', 'Gate_1/gate'), ('lenet5', 'Gate_1/gate')])
def test_gates_that_cut_every_path_are_refused(name, gate):
  _, params, _, kw, shape = random_gates(name, 0)
  flat = flatten(params)
  flat[gate] = jnp.zeros_like(flat[gate])
  with pytest.raises(SliceError, match='no path from the input to the output'):
    slice_params(name, dict(kw, gates=True), 10, shape, unflatten(flat))


def test_one_pass_then_sliced_file_evaluates_as_the_run(mnist_slice, tmp_path):
  import json
  import os
  import subprocess
  import sys

  from conftest import REPO, tiny_config

  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.export.model_file import export_run, load
  from pemn_jax.train.loop import train_and_evaluate
  spec = {'name': 'gated', 'sparsity': 0.5, 'warmup': 0.0, 'ramp': 0.1, 'source': {'name': 'dense'}}
  c = tiny_config(mnist_slice, param=spec, num_steps=40, log_every=4,
                  **{'optimizer.lr': 0.02, 'model_kwargs.gates': True})
  c.model_kwargs.hidden = (32, 16)
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  recs = [json.loads(x) for x in open(tmp_path / 'run' / 'metrics.jsonl')]
  last = [r for r in recs if 'gate_sparsity' in r][-1]
  assert last['gate_sparsity'] > 0.2 and 'gate_near0' in last  # gates closed (a 40-step toy)
  # The gated file (gates as 1-bit sections) and the sliced one evaluate as the run did.
  gated_file, sliced_file = str(tmp_path / 'g.pemn'), str(tmp_path / 's.pemn')
  export_run(str(tmp_path / 'run'), gated_file, params_dir=None)
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={tmp_path / "run"}',
                      f'--out={sliced_file}', '--slice'], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  assert os.path.isdir(sliced_file + '.params')  # the orbax export of the sliced params
  header, model, params, _ = load(sliced_file)
  assert header['param'] == {'name': 'dense'} and header['model_kwargs']['gates'] is False
  h1, h2 = header['model_kwargs']['hidden']
  assert h1 < 32 or h2 < 16
  n = 784 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10  # the sliced MLP's params, by hand
  assert f'sliced: hidden [32, 16] -> [{h1}, {h2}]; params ' in p.stdout, p.stdout
  assert f'-> {n:,} (' in p.stdout, p.stdout
  [goal] = out['goals']  # what training said of its sparsity
  assert goal['reached'] == pytest.approx(last['gate_sparsity']) and goal['asked'] == 0.5
  assert os.path.getsize(sliced_file) < os.path.getsize(gated_file)
  for path in (gated_file, sliced_file):
    ev = evaluate_artifact(path, 'mnist', mnist_slice['data_dir'], mnist_slice['source_dir'])
    assert ev['accuracy'] == pytest.approx(out['test_accuracy'], abs=0.011)

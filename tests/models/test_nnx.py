"""NNX models and user models: the same library, whatever the model is."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tree_equal
from flax import linen as nn

from pemn_jax import models
from pemn_jax import params as param_lib
from pemn_jax.evaluate import evaluate_artifact
from pemn_jax.export.model_file import export_run, load
from pemn_jax.train.loop import train_and_evaluate
from pemn_jax.train.run import restore
from pemn_jax.train.step import loss_fn

SPECS = {
    'dense': {'name': 'dense'},
    'rpg': {'name': 'ring', 'dof': 500},
    'rpg_stages': {'name': 'ring', 'dof': 300, 'select': '@stages'},
    'pemn_rp': {'name': 'masked', 'keep': 0.4,
                'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 0.01}},
    'pemn_ol': {'name': 'masked', 'source': {'name': 'prototype', 'mode': 'ol'}},
    'pemn_mp': {'name': 'masked', 'source': {'name': 'prototype', 'mode': 'mp'}},
    'edge_popup': {'name': 'masked', 'source': {'name': 'prototype', 'mode': 'signed_constant',
                                                'rest': 'fixed'}},
    'supermask': {'name': 'masked', 'kind': 'supermask',
                  'source': {'name': 'prototype', 'mode': 'dense', 'rest': 'fixed'}},
}
TWINS = [('lenet5', 'lenet5_nnx', {}, (28, 28, 1)),
         ('resnet20', 'resnet20_nnx', {'width': 4}, (32, 32, 3))]


@pytest.mark.parametrize('linen,nnx_name,kw,shape', TWINS)
@pytest.mark.parametrize('spec', sorted(SPECS))
def test_nnx_and_linen_twins_give_the_same_losses_and_gradients(linen, nnx_name, kw, shape,
                                                                 spec):
  a, b = models.get(linen, **kw), models.get(nnx_name, **kw)
  ta, tb = models.abstract_params(a, shape), models.abstract_params(b, shape)
  pa, pb = param_lib.build(SPECS[spec], ta, model=a), param_lib.build(SPECS[spec], tb, model=b)
  assert pa.select('@stages') == pb.select('@stages')  # creation order agrees too
  state = pa.init(jax.random.key(0))
  assert tree_equal(state, pb.init(jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (8, *shape))
  y = jnp.arange(8) % 10
  rng = jax.random.key(2)
  outs = []
  for model, param in ((a, pa), (b, pb)):
    ms = models.init_model_state(model, shape)
    step = jax.jit(lambda st, ms, model=model, param=param: jax.value_and_grad(
        loss_fn, argnums=2, has_aux=True)(model, param, st, ms, jnp.uint32(7), x, y, rng, True))
    (loss, (new_ms, *_)), grads = step(state, ms)
    outs.append((loss, grads, new_ms))
  np.testing.assert_allclose(float(outs[0][0]), float(outs[1][0]), rtol=1e-5)
  for ga, gb in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1]), strict=True):
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=1e-4, atol=1e-6)
  for sa, sb in zip(jax.tree.leaves(outs[0][2]), jax.tree.leaves(outs[1][2]), strict=True):
    np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), rtol=1e-5, atol=1e-6)


def test_an_nnx_model_with_batch_norm_trains_resumes_exports_and_evaluates(mnist_slice, tmp_path):
  spec = {'name': 'masked', 'keep': 0.5,
          'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 0.01}}
  over = {'optimizer.lr': 0.05, 'model': 'resnet20_nnx', 'num_steps': 12, 'log_every': 2}
  c = tiny_config(mnist_slice, param=spec, **over)
  c.model_kwargs = {'width': 4, 'in_channels': 1}
  straight = train_and_evaluate(c, str(tmp_path / 'a'))
  with open(tmp_path / 'a' / 'metrics.jsonl') as f:
    losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
  assert losses[-1] < losses[0]  # it trains
  c.stop_at_step = 6
  train_and_evaluate(c, str(tmp_path / 'b'))
  c.stop_at_step = None
  resumed = train_and_evaluate(c, str(tmp_path / 'b'))
  ta, tb = restore(str(tmp_path / 'a')).train_state, restore(str(tmp_path / 'b')).train_state
  assert tree_equal(ta.state, tb.state) and tree_equal(ta.model_state, tb.model_state)
  assert 'batch_stats' in ta.model_state  # BatchNorm statistics carried through the step
  assert resumed['test_accuracy'] == straight['test_accuracy']
  path = str(tmp_path / 'nnx.pemn')
  export_run(str(tmp_path / 'a'), path, params_dir=None)
  ev = evaluate_artifact(path, 'mnist', mnist_slice['data_dir'], mnist_slice['source_dir'])
  assert ev['accuracy'] == pytest.approx(straight['test_accuracy'], abs=1e-9)


def test_the_nnx_twin_trains_like_its_linen_twin(mnist_slice, tmp_path):
  accs = {}
  for name in ('lenet5', 'lenet5_nnx'):
    c = tiny_config(mnist_slice, model=name, num_steps=24, **{'optimizer.lr': 3e-3})
    c.model_kwargs = {}
    accs[name] = train_and_evaluate(c, str(tmp_path / name))['test_accuracy']
  assert accs['lenet5'] > 0.4 and abs(accs['lenet5'] - accs['lenet5_nnx']) < 0.03


class TinyLinen(nn.Module):
  """A user's own Linen model (used by import path below)."""
  width: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes)(x)


def test_a_user_linen_model_by_import_path_trains_and_its_file_needs_the_model(
    mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, model='test_nnx:TinyLinen', **{'optimizer.lr': 3e-3})
  c.model_kwargs = {'width': 24}
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  assert out['test_accuracy'] > 0.3 and out['num_params'] == 784 * 24 + 24 + 24 * 10 + 10
  path = str(tmp_path / 'user.pemn')
  export_run(str(tmp_path / 'run'), path, params_dir=None)
  from pemn_jax.export.artifact import ArtifactError
  with pytest.raises(ArtifactError, match='pass the model'):
    load(path)  # the file names test_nnx:TinyLinen: nothing is imported because of it
  ev = evaluate_artifact(path, 'mnist', mnist_slice['data_dir'], mnist_slice['source_dir'],
                         model=TinyLinen)
  assert ev['accuracy'] == pytest.approx(out['test_accuracy'], abs=1e-9)


def test_models_register_and_bad_import_paths():
  models.register('tiny_linen_test', TinyLinen, replace=True)
  assert isinstance(models.get('tiny_linen_test', width=8), TinyLinen)
  with pytest.raises(ValueError, match='already registered'):
    models.register('mlp', TinyLinen)
  with pytest.raises(ValueError, match='cannot import'):
    models.get('no_such_package.x:Model')
  with pytest.raises(ValueError, match='unknown model'):
    models.get('not a path')
  del models.REGISTRY['tiny_linen_test']


def test_tensorboard_events_hold_the_logged_scalars_and_plot_draws_them(mnist_slice, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  c = tiny_config(mnist_slice, num_steps=12, log_every=4, eval_every=6)
  train_and_evaluate(c, str(tmp_path / 'run'))
  acc = EventAccumulator(str(tmp_path / 'run' / 'tensorboard'))
  acc.Reload()
  tags = acc.Tags()['scalars']
  assert {'loss', 'accuracy', 'test_accuracy', 'lr'} <= set(tags)
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    recs = [json.loads(x) for x in f]
  want = [(r['step'], r['loss']) for r in recs if 'loss' in r]
  got = [(e.step, e.value) for e in acc.Scalars('loss')]
  assert [s for s, _ in got] == [s for s, _ in want]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
  from pemn_jax.plot import plot
  out = plot([str(tmp_path / 'run')], str(tmp_path / 'curves.png'))
  assert os.path.getsize(out) > 1000

import ml_collections
import numpy as np
import pytest

from pemn_jax.config import base_config
from pemn_jax.train.optim import make_schedule


def cfg(**kw):
  c = base_config().optimizer
  c.update(**kw)
  return c


def test_onecycle_is_evaluated_after_the_step_as_the_pemn_reference():
  # PEMN: lr(t) = interp(epoch + (i + 1) / len, [0, 2E//5, 4E//5, E], [0, lr, lr/20, 0]).
  e, spe, lr = 10, 7, 0.05
  sched = make_schedule(cfg(lr=lr, schedule='onecycle'), e * spe, spe)
  for step in range(e * spe):
    epoch, i = divmod(step, spe)
    t = epoch + (i + 1) / spe
    expected = np.interp(t, [0, e * 2 // 5, e * 4 // 5, e], [0, lr, lr / 20, 0])
    assert float(sched(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9), step


def test_exponential_is_rpgs_per_epoch_decay():
  # RPG: lr * 0.1 ** (epoch / ed), set at the start of each epoch.
  sched = make_schedule(cfg(lr=0.1, schedule='exponential', decay_epochs=45.0), 90 * 5, 5)
  for step in (0, 4, 5, 224, 225, 449):
    assert float(sched(step)) == pytest.approx(0.1 * 0.1 ** ((step // 5) / 45), rel=1e-6)
  with pytest.raises(ValueError, match='decay_epochs'):
    make_schedule(cfg(schedule='exponential', decay_epochs=0.0), 10, 1)


def test_unknown_schedule():
  with pytest.raises(ValueError, match='schedule'):
    make_schedule(ml_collections.ConfigDict(dict(cfg(), schedule='linear')), 10)


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
  """The loss with label_smoothing=s is -sum(t log softmax) with t = (1 - s)
  one-hot + s / C, computed here in numpy (torch's CrossEntropyLoss(label_smoothing))."""
  import jax.numpy as jnp

  from pemn_jax import models
  from pemn_jax import params as param_lib
  from pemn_jax.train.step import loss_fn
  model = models.get('mlp', hidden=(8,), num_classes=5)
  params = model.init(__import__('jax').random.key(0), jnp.zeros((1, 4, 4, 1)))['params']
  param = param_lib.build({'name': 'dense'}, params)
  images = np.random.default_rng(0).normal(size=(6, 4, 4, 1)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 0])
  logits = np.asarray(model.apply({'params': params}, images), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for s in (0.0, 0.1):
    t = (1 - s) * np.eye(5)[labels] + s / 5
    want = float(-(t * logp).sum(-1).mean())
    got, _ = loss_fn(model, param, params, {}, 0, images, labels, train=False, label_smoothing=s)
    assert abs(float(got) - want) < 1e-5, (s, float(got), want)

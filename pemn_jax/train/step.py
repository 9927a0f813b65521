"""The train state and the jitted step, method-agnostic.

The optimizer sees only ``state`` (what the parameterization trains); the model
sees only the materialized params. The step never learns a method's name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from pemn_jax.ops.hashing import as_seed
from pemn_jax.params.base import Parameterization


@struct.dataclass
class TrainState:
  step: jax.Array
  state: Any           # the parameterization's trainable state
  opt_state: Any       # optax state of ``state`` only
  model_state: Any     # non-param collections (batch_stats), not trained by optax
  seed: jax.Array      # uint32 scalar: weights / permutations derive from it


def create_train_state(param: Parameterization, tx: optax.GradientTransformation, key,
                       model_state=None, seed: int = 0) -> TrainState:
  """Initial train state; ``param.init`` and ``tx.init`` run as one jitted call
  (eagerly, each of their many small ops would compile on its own)."""
  def init(k):
    state = param.init(k)
    return state, tx.init(state)

  state, opt_state = jax.jit(init)(key)
  return TrainState(step=jnp.zeros((), jnp.int32), state=state, opt_state=opt_state,
                    model_state=model_state or {}, seed=as_seed(seed))


def in_dtype(dtype, params, images):
  """Generated params and the batch cast once to the compute dtype (mixed
  precision: the trained state, the optimizer state, batch statistics and
  the loss stay float32); None or float32: unchanged."""
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return params, images
  return (jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                       else x, params), images.astype(dtype))


def loss_fn(model, param: Parameterization, state, model_state, seed, images, labels,
            rng=None, train: bool = True, step=0, materialize=None, dtype=None,
            label_smoothing: float = 0.0):
  """Cross-entropy + the parameterization's regularizer at ``step``.

  Args:
    model, param: the Flax module and the parameterization.
    state, model_state, seed: the trained state, batch statistics, the seed.
    images, labels: the batch.
    rng: the step's key (stochastic methods), or None.
    train: training mode (batch statistics update).
    step: the step number (regularizer schedules).
    materialize: ``(param, state, seed, rng) -> params``; default
      ``param.materialize`` (the trainer passes ``Layout.materialize``: the
      same params, generated per device and laid out per its rules).
    dtype: the compute dtype (``in_dtype``; None: float32).
    label_smoothing: the targets' mass spread uniformly over the classes
      (Szegedy et al.; 0: one-hot).
  Returns:
    ``(loss + regularizer, (new_model_state, logits, loss, regularizer))``.
  """
  params, images = in_dtype(dtype, (materialize or _materialize)(param, state, seed, rng), images)
  variables = {'params': params, **model_state}
  if train and model_state:
    logits, new_model_state = model.apply(variables, images, train=True,
                                          mutable=list(model_state))
  else:
    logits, new_model_state = model.apply(variables, images, train=train), model_state
  logits = logits.astype(jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  reg = param.regularizer(state, seed, step)
  return loss + reg, (new_model_state, logits, loss, reg)


def eval_batch(model, materialize, model_state, images, labels, weights, rngs=None,
               dtype=None):
  """Sums of (correct, weight, loss) of one evaluation batch: the one function
  behind the trainer's evaluation and ``pemn_jax.evaluate``.

  Args:
    model: the Flax module.
    materialize: ``rng -> params`` (a trained run: ``param.materialize(state,
      seed, rng)``; a model file: its fixed params).
    model_state: non-param collections (batch statistics).
    images, labels, weights: the batch; weight 0 marks padding.
    rngs: None (evaluate ``materialize(None)``), or keys whose networks'
      predicted probabilities are averaged (a stochastic method's
      ``eval_rngs``).
    dtype: the compute dtype (``in_dtype``; None: float32).
  Returns:
    ``(sum of weights of correct predictions, sum of weights, weighted sum of
    cross-entropy)``.
  """
  def log_probs(rng):
    params, x = in_dtype(dtype, materialize(rng), images)
    logits = model.apply({'params': params, **model_state}, x, train=False)
    return jax.nn.log_softmax(logits.astype(jnp.float32))

  if rngs is None:
    logp = log_probs(None)
  else:
    total = jax.lax.fori_loop(1, rngs.shape[0],
                              lambda i, acc: acc + jnp.exp(log_probs(rngs[i])),
                              jnp.exp(log_probs(rngs[0])))
    logp = jnp.log(total / rngs.shape[0])
  nll = -jnp.take_along_axis(logp, labels[:, None], 1)[:, 0]
  hit = (jnp.argmax(logp, -1) == labels).astype(jnp.float32)
  return jnp.sum(hit * weights), jnp.sum(weights), jnp.sum(nll * weights)


def eval_sums(eval_step, pipe, *args, batch_sharding=None):
  """(correct, total, loss) of ``eval_step(*args, images, labels, weights)``
  summed over ``pipe``'s evaluation batches: the one evaluation loop behind
  the trainer, the sweeps, ``pemn_jax.evaluate`` and ``evolve``.

  Args:
    eval_step: a jitted ``eval_batch`` (scalars, or one per variant) that
      normalizes the uint8 images it is given (``Pipeline.normalize``).
    pipe: the evaluation ``Pipeline``.
    *args: its leading arguments (train state, or params).
    batch_sharding: lay each process's batch out as a global array per this
      sharding (default: pass the host arrays).
  Returns:
    Float64 numpy arrays (scalars, or one per variant of a vmapped sweep).
  """
  correct = total = loss = 0.0
  for batch in pipe.eval_batches():
    if batch_sharding is not None:
      batch = [jax.make_array_from_process_local_data(batch_sharding, np.asarray(a))
               for a in batch]
    out = eval_step(*args, *batch)
    correct, total, loss = correct + out[0], total + out[1], loss + out[2]
  return tuple(np.asarray(jax.device_get(x), np.float64) for x in (correct, total, loss))


def evaluate_params(model, params, model_state, pipe) -> dict:
  """Accuracy and loss of fixed ``params`` on ``pipe``'s evaluation batches.

  The params are arguments of the jitted step, not constants folded into it.

  Returns:
    ``{'accuracy', 'loss', 'examples'}``.
  """
  step = jax.jit(lambda p, s, images, *rest: eval_batch(model, lambda rng: p, s,
                                                       pipe.normalize(images), *rest))
  correct, total, loss = eval_sums(step, pipe, params, model_state)
  return {'accuracy': float(correct / total), 'loss': float(loss / total),
          'examples': int(total)}


def _materialize(param, state, seed, rng):
  return param.materialize(state, seed, rng)


def make_train_step(model, param: Parameterization, tx: optax.GradientTransformation,
                    materialize=None, dtype=None, label_smoothing: float = 0.0):
  """``step(train_state, images, labels, rng) -> (train_state, metrics)`` (not
  jitted); ``materialize``, ``dtype`` and ``label_smoothing`` as in ``loss_fn``."""

  def step(ts: TrainState, images, labels, rng=None):
    grad_fn = jax.value_and_grad(loss_fn, argnums=2, has_aux=True)
    (_, (model_state, logits, loss, reg)), grads = grad_fn(
        model, param, ts.state, ts.model_state, ts.seed, images, labels, rng, True, ts.step,
        materialize, dtype, label_smoothing)
    updates, opt_state = tx.update(grads, ts.opt_state, ts.state)
    state = param.project(optax.apply_updates(ts.state, updates))
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    extra = param.metrics(state, ts.seed, ts.step + 1)
    ts = ts.replace(step=ts.step + 1, state=state, opt_state=opt_state, model_state=model_state)
    if param.has_regularizer:  # logged apart: 'loss' is the task's cross-entropy
      extra = {'regularizer': reg, **extra}
    return ts, {'loss': loss, 'accuracy': acc, **extra}

  return step

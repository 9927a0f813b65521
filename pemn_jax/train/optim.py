"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'onecycle', 'exponential')


def make_schedule(cfg, total_steps: int, steps_per_epoch: int = 1, lr=None):
  """The learning-rate schedule ``step -> lr`` of ``cfg`` (config.optimizer).

  Every schedule is ``lr * shape(step)`` with ``shape`` the schedule at lr 1,
  so ``lr`` may be a traced value (a sweep's per-variant learning rate) and a
  run computes its rates with the same arithmetic either way.

  Args:
    cfg: the optimizer config (``lr``, ``schedule``, ``warmup_steps``,
      ``decay_epochs``).
    total_steps: the run's length.
    steps_per_epoch: for the per-epoch ``exponential`` schedule.
    lr: the peak learning rate (default ``cfg.lr``; may be a jax array).
  Returns:
    A function of the (0-based) step.
  """
  lr = float(cfg.lr) if lr is None else lr
  shape = _shape(cfg, total_steps, steps_per_epoch)
  return lambda step: lr * shape(step)


def _shape(cfg, total_steps: int, steps_per_epoch: int):
  """The schedule at peak learning rate 1."""
  warmup = int(cfg.get('warmup_steps', 0))
  if cfg.schedule == 'constant':
    sched = optax.constant_schedule(1.0)
  elif cfg.schedule == 'cosine':
    sched = optax.cosine_decay_schedule(1.0, max(1, total_steps - warmup))
  elif cfg.schedule == 'exponential':
    # RPG's reference: lr * 0.1 ** (epoch / decay_epochs), set once per epoch.
    spe, ed = max(1, int(steps_per_epoch)), float(cfg.get('decay_epochs', 0.0))
    if ed <= 0:
      raise ValueError('config.optimizer.decay_epochs must be > 0 for the exponential schedule')
    sched = lambda step: 0.1 ** ((step // spe) / ed)  # noqa: E731
  elif cfg.schedule == 'onecycle':
    # PEMN: piecewise linear 0 -> lr at 40% -> lr/20 at 80% -> 0 at the end,
    # evaluated after the step as the reference does (lr(epoch + (i+1)/len)).
    t = float(total_steps)
    xs = jnp.array([0.0, 0.4 * t, 0.8 * t, t])
    ys = jnp.array([0.0, 1.0, 1.0 / 20, 0.0])
    return lambda step: jnp.interp(step + 1, xs, ys)
  else:
    raise ValueError(f'config.optimizer.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}')
  if warmup:
    sched = optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), sched], [warmup])
  return sched


def make_optimizer(cfg, total_steps: int, steps_per_epoch: int = 1, decay: bool | None = None):
  """The optimizer of ``cfg`` (config.optimizer), its learning rate and weight
  decay held in its state (``optax.inject_hyperparams``): a sweep sets them
  per variant with ``set_hyperparams``, and a resumed run can lower the rate.

  Args:
    cfg: the optimizer config.
    total_steps, steps_per_epoch: the run's length (the schedule's).
    decay: include the weight-decay term (default: ``cfg.weight_decay > 0``;
      a sweep over weight decay includes it for every variant -- adding
      ``0 * w`` changes nothing).
  Returns:
    (optax transformation, schedule of ``cfg.lr``).
  """
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}')
  decay = bool(float(cfg.weight_decay)) if decay is None else bool(decay)
  clip = float(cfg.get('grad_clip', 0.0))

  def factory(learning_rate, weight_decay):
    sched = make_schedule(cfg, total_steps, steps_per_epoch, lr=learning_rate)
    if cfg.name == 'sgd':
      tx = optax.chain(optax.add_decayed_weights(weight_decay) if decay else optax.identity(),
                       optax.sgd(sched, momentum=float(cfg.momentum) or None,
                                 nesterov=bool(cfg.nesterov)))
    elif cfg.name == 'adamw':
      tx = optax.adamw(sched, weight_decay=weight_decay)
    else:
      tx = optax.chain(optax.add_decayed_weights(weight_decay) if decay else optax.identity(),
                       optax.adam(sched))
    if clip > 0:
      tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx

  tx = optax.inject_hyperparams(factory)(learning_rate=float(cfg.lr),
                                         weight_decay=float(cfg.weight_decay))
  return tx, make_schedule(cfg, total_steps, steps_per_epoch)


def _injected(x) -> bool:
  """An ``optax.inject_hyperparams`` state (its class differs across optax
  versions: stateful and stateless variants)."""
  return hasattr(x, 'hyperparams') and hasattr(x, 'inner_state') and hasattr(x, '_replace')


def set_hyperparams(opt_state, **values):
  """``opt_state`` with the optimizer's injected hyperparameters replaced.

  Args:
    opt_state: the state of ``make_optimizer``'s transformation (possibly
      inside a pruning wrapper's state).
    **values: ``learning_rate=``, ``weight_decay=`` (scalars or arrays; a
      stacked sweep state takes one value per variant).
  Returns:
    The new state (the same structure).
  Raises:
    ValueError: no injected hyperparameters in ``opt_state``.
  """
  found = []

  def swap(x):
    if _injected(x):
      found.append(1)
      hp = dict(x.hyperparams)
      for k, v in values.items():
        if k not in hp:
          raise ValueError(f'the optimizer has no hyperparameter {k!r}; it has {sorted(hp)}')
        hp[k] = jnp.asarray(v, jnp.asarray(hp[k]).dtype)
      return x._replace(hyperparams=hp)
    return x

  out = jax.tree.map(swap, opt_state,
                     is_leaf=_injected)
  if not found:
    raise ValueError('this optimizer state holds no injected hyperparameters '
                     '(pemn_jax.train.optim.make_optimizer makes them)')
  return out


def with_pruning(tx, prune_cfg, total_steps: int, seed: int, param=None):
  """Wraps ``tx`` with a pruning baseline when ``prune_cfg.criterion`` is set.

  Args:
    tx: the dense params' optimizer.
    prune_cfg: ``config.prune``.
    total_steps: the run's length (``begin_fraction``/``end_fraction`` of it).
    seed: the run's seed (random masks).
    param: the (dense) parameterization: the pruned leaves are its kernels in
      creation order, the first one left out when ``prune_cfg.skip_first``.
  Returns:
    ``tx`` or the pruning wrapper around it.
  """
  if not prune_cfg.criterion:
    return tx
  from pemn_jax.train.pruning import prune
  kernels = [p for p in param.order if p in set(param.select('@kernels'))]
  paths = kernels[1:] if prune_cfg.skip_first else kernels
  begin = int(prune_cfg.begin_fraction * total_steps)
  end = max(begin + 1, int(prune_cfg.end_fraction * total_steps))
  return prune(tx, float(prune_cfg.sparsity), prune_cfg.criterion, paths,
               allocation=prune_cfg.allocation, begin=begin, end=end,
               every=int(prune_cfg.every), seed=seed)

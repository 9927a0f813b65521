"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'onecycle', 'exponential')


def make_schedule(cfg, total_steps: int, steps_per_epoch: int = 1):
  """The learning-rate schedule ``step -> lr`` of ``cfg`` (config.optimizer).

  Args:
    cfg: the optimizer config (``lr``, ``schedule``, ``warmup_steps``,
      ``decay_epochs``).
    total_steps: the run's length.
    steps_per_epoch: for the per-epoch ``exponential`` schedule.
  Returns:
    A function of the (0-based) step.
  """
  lr = float(cfg.lr)
  warmup = int(cfg.get('warmup_steps', 0))
  if cfg.schedule == 'constant':
    sched = optax.constant_schedule(lr)
  elif cfg.schedule == 'cosine':
    sched = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
  elif cfg.schedule == 'exponential':
    # RPG's reference: lr * 0.1 ** (epoch / decay_epochs), set once per epoch.
    spe, ed = max(1, int(steps_per_epoch)), float(cfg.get('decay_epochs', 0.0))
    if ed <= 0:
      raise ValueError('config.optimizer.decay_epochs must be > 0 for the exponential schedule')
    sched = lambda step: lr * 0.1 ** ((step // spe) / ed)  # noqa: E731
  elif cfg.schedule == 'onecycle':
    # PEMN: piecewise linear 0 -> lr at 40% -> lr/20 at 80% -> 0 at the end,
    # evaluated after the step as the reference does (lr(epoch + (i+1)/len)).
    t = float(total_steps)
    xs = jnp.array([0.0, 0.4 * t, 0.8 * t, t])
    ys = jnp.array([0.0, lr, lr / 20, 0.0])
    return lambda step: jnp.interp(step + 1, xs, ys)
  else:
    raise ValueError(f'config.optimizer.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}')
  if warmup:
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
  return sched


def make_optimizer(cfg, total_steps: int, steps_per_epoch: int = 1):
  """Returns (optax transformation, schedule) for ``cfg`` (config.optimizer)."""
  sched = make_schedule(cfg, total_steps, steps_per_epoch)
  wd = float(cfg.weight_decay)
  if cfg.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                     optax.sgd(sched, momentum=float(cfg.momentum) or None,
                               nesterov=bool(cfg.nesterov)))
  elif cfg.name == 'adamw':
    tx = optax.adamw(sched, weight_decay=wd)
  elif cfg.name == 'adam':
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(), optax.adam(sched))
  else:
    raise ValueError(f'config.optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}')
  if float(cfg.get('grad_clip', 0.0)) > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), tx)
  return tx, sched


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

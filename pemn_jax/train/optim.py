"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'onecycle')


def make_schedule(cfg, total_steps: int):
  lr = float(cfg.lr)
  warmup = int(cfg.get('warmup_steps', 0))
  if cfg.schedule == 'constant':
    sched = optax.constant_schedule(lr)
  elif cfg.schedule == 'cosine':
    sched = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
  elif cfg.schedule == 'onecycle':
    # PEMN: piecewise linear 0 -> lr at 40% -> lr/20 at 80% -> 0 at the end.
    t = float(total_steps)
    xs = jnp.array([0.0, 0.4 * t, 0.8 * t, t])
    ys = jnp.array([0.0, lr, lr / 20, 0.0])
    return lambda step: jnp.interp(step, xs, ys)
  else:
    raise ValueError(f'config.optimizer.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}')
  if warmup:
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
  return sched


def make_optimizer(cfg, total_steps: int):
  """Returns (optax transformation, schedule)."""
  sched = make_schedule(cfg, total_steps)
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


def with_pruning(tx, prune_cfg, total_steps: int, seed: int):
  """Wraps ``tx`` with a pruning baseline when ``prune_cfg.criterion`` is set."""
  if not prune_cfg.criterion:
    return tx
  from pemn_jax.train.pruning import prune
  end = int(prune_cfg.end_fraction * total_steps)
  return prune(tx, float(prune_cfg.sparsity), prune_cfg.criterion, begin=0, end=max(1, end),
               every=int(prune_cfg.every), seed=seed)

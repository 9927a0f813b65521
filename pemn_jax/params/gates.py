"""Polarization gating (Zhi et al. 2023, arXiv 2302.10798): binary gates over
channels and residual branches, trained in one pass with the weights, pushed
to a user-set sparsity by a polarization regularizer; the result is sliced
physically (``pemn_jax.surgery``).

The model is built with ``gates=True``: it multiplies chosen activations by
``gate`` params and describes, in its ``gate_structure()``, which weights each
gate removes. This parameterization trains one real ``gamma`` per gate and
materializes the gate leaves as

    g = straight_through(1[clip(gamma, 0, 1) > threshold], clip(gamma, 0, 1)),

exactly 0/1 in the forward pass, the gradient flowing to ``gamma``; every
other leaf comes from ``source`` (dense by default; any parameterization).

The regularizer (our construction; the paper's code is not public), with
``s`` the target fraction of kernel weights removed and ``w_j`` the share of
kernel weights gate j switches:

    R = lambda(step) * [ t * m - sum_j w_j |g~_j - m|              (Zhuang)
                         + rho * sum_j w_j (1/2 - |g~_j - 1/2|)     (poles)
                         + mu * (S(g) - s)^2 ],                    (budget)
    m = sum_j w_j g~_j,  t = 4 s - 2,

The first part is Zhuang et al.'s polarization regularizer (NeurIPS 2020),
cost-weighted: over gates in [0, 1] it is minimized by a weight share
(2 + t) / 4 = s of gates at 0 and the rest at 1 -- so the target sets t.
``S`` is the fraction of kernel weights the 0/1 gates remove, computed
exactly from the gate structure (a weight is kept iff every gate over it is
open), with the straight-through gradient of the same product of means over
the soft gates; the second part steers the cost-weighted approximation to the
exact target (on the soft gates alone it could be met by gates hovering just
above the threshold, all still open). Zhuang's term splits the gates at their
mean, not at the threshold, so gates between the two were pushed across it and
back: the pole term pushes every gate away from 1/2 to 0 or 1. Measured on
the gates of a 784-300-100-10 MLP with the regularizer alone (600 Adam steps,
targets 0.3/0.5/0.7; sparsity reached, fraction of gates within 0.1 of 0 or 1):
budget + Zhuang: 0.299/0.506/0.700, 52/60/34% polarized; + poles rho=1: 90/64/62%;
rho=10: 0.314/0.510/0.694, 100/100/100%; poles without Zhuang's term (rho=5):
82/67/100%. In real training the pole term also freezes gates before the
budget has settled (MNIST MLP, 600 steps: rho=10 reached 0.268/0.486/0.679,
rho=3 0.297/0.502/0.706), so the default is rho=3; the forward pass always uses
0/1 gates, so polarization only matters for how stable the gates are -- the
sliced network is exact either way. ``lambda`` is 0 for ``warmup`` and ramps
to ``strength`` over ``ramp`` (fractions of the run).
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax.ops.topk import straight_through
from pemn_jax.params.base import Parameterization, flatten, size, unflatten

GATES = r'(^|/)gate$'


def _is_kernel(path: str) -> bool:
  return path.rsplit('/', 1)[-1] == 'kernel'


class Gated(Parameterization):
  """Polarization-regularized binary gates over a gated model's channels and
  residual branches, composed over any source parameterization.

  Args:
    source: the parameterization of every leaf but the gates.
    target: the model's params (with the gate leaves).
    model: the gated Flax model (its ``gate_structure()``).
    total_steps: the run's length (``warmup``/``ramp`` are fractions of it).
    sparsity: target fraction of the model's kernel weights to remove.
    strength: the regularizer's weight once ramped up.
    budget: ``mu``, the weight of the exact-sparsity term.
    polarize: ``rho``, the weight of the pole term.
    warmup, ramp: fractions of the run before / over which ``lambda`` rises.
    threshold: a gate is open iff ``clip(gamma, 0, 1) > threshold``.
  """

  takes_source = True
  traced = ('sparsity',)
  default_source = {'name': 'dense'}

  @classmethod
  def source_target(cls, target):
    flat = flatten(target)
    return unflatten({p: v for p, v in flat.items() if not re.search(GATES, p)})

  def __init__(self, source: Parameterization, target=None, model=None, total_steps: int = 1,
               sparsity: float = 0.5, strength: float = 1.0, budget: float = 100.0,
               polarize: float = 3.0, warmup: float = 0.1, ramp: float = 0.3,
               threshold: float = 0.5):
    if model is None or not hasattr(model, 'gate_structure'):
      raise ValueError('gated needs a model built with gates=True (model_kwargs.gates=true) '
                       'whose class has gate_structure()')
    super().__init__(target if target is not None else source.target)
    for name, v, lo, hi in [('sparsity', sparsity, 0.0, 0.99), ('strength', strength, 0, 1e6),
                            ('budget', budget, 0, 1e6), ('polarize', polarize, 0, 1e6),
                            ('warmup', warmup, 0, 1),
                            ('ramp', ramp, 0, 1), ('threshold', threshold, 0.01, 0.99)]:
      if not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f'gated {name} must be in [{lo}, {hi}], got {v!r}')
    self.source, self.model = source, model
    self.sparsity, self.strength, self.budget = float(sparsity), float(strength), float(budget)
    self.polarize = float(polarize)
    self.threshold = float(threshold)
    self.warmup_steps = int(warmup * total_steps)
    self.ramp_steps = max(1, int(ramp * total_steps))
    self.structure = model.gate_structure()
    self.gate_paths = sorted(self.structure.gates)
    missing = [g for g in self.gate_paths if g not in self.leaves]
    if missing or not self.gate_paths:
      raise ValueError(f'the model has no gate leaves {missing[:3] or ""}: build it with '
                       'gates=True')
    # Kernel weights each gate switches (its cost), and the model's total.
    kernels = {p: v.shape for p, v in self.leaves.items() if _is_kernel(p)}
    self.total_kernel = sum(size(s) for s in kernels.values())
    cost = dict.fromkeys(self.gate_paths, 0.0)
    for path, factors in self.structure.leaves.items():
      if path in kernels:
        for f in factors:
          n = size(kernels[path])
          cost[f.gate] += n if f.axis is None else n / kernels[path][f.axis]
    total = sum(cost.values())
    self.weights = {g: c / total for g, c in cost.items()}
    self.t = 4.0 * self.sparsity - 2.0

  def hyperparams(self) -> dict:
    """The target sparsity and its polarization threshold ``t = 4 s - 2``."""
    return {**super().hyperparams(), 'sparsity': np.float32(self.sparsity),
            't': np.float32(self.t)}

  def with_hyperparams(self, hyper) -> Parameterization:
    out = super().with_hyperparams(hyper)
    if 'sparsity' in hyper:
      out = out if out is not self else copy.copy(self)
      out.sparsity, out.t = hyper['sparsity'], hyper['t']
    return out

  def init(self, key):
    return {'source': self.source.init(key),
            'gates': unflatten({g: jnp.ones(self.leaves[g].shape, jnp.float32)
                                for g in self.gate_paths})}

  def project(self, state):
    """Gates stay in [0, 1] (projected gradient descent, as Zhuang et al. keep
    their scaling factors in [0, a]): a gate pushed past 1 would otherwise sit
    where the clip has no gradient and never close again."""
    return {'source': self.source.project(state['source']),
            'gates': jax.tree.map(lambda g: jnp.clip(g, 0.0, 1.0), state['gates'])}

  def soft(self, state) -> dict[str, jax.Array]:
    """clip(gamma, 0, 1) of every gate."""
    flat = flatten(state['gates'])
    return {g: jnp.clip(flat[g], 0.0, 1.0) for g in self.gate_paths}

  def hard(self, state) -> dict[str, jax.Array]:
    """The 0/1 gates the forward pass uses (straight-through to the soft ones)."""
    return {g: straight_through((s > self.threshold).astype(s.dtype), s)
            for g, s in self.soft(state).items()}

  def materialize(self, state, seed, rng=None):
    params = flatten(self.source.materialize(state['source'], seed, rng))
    params.update({g: v.astype(self.leaves[g].dtype) for g, v in self.hard(state).items()})
    return unflatten({p: params[p] for p in self.leaves})

  def kept_kernel_weights(self, gates: dict) -> jax.Array:
    """Kernel weights kept under (soft or 0/1) gates: per leaf, its size times
    the mean of each gated axis's expanded gate, times its branch gates."""
    eff = self.structure.effective(gates)
    kept = 0.0
    for path, leaf in self.leaves.items():
      if not _is_kernel(path):
        continue
      shape = leaf.shape
      factor = jnp.ones((), jnp.float32)
      for f in self.structure.leaves.get(path, []):
        g = eff[f.gate]
        factor = factor * (g[0] if f.axis is None else jnp.mean(f.expand(g, shape[f.axis])))
      kept = kept + size(shape) * factor
    return kept

  def sparsity_of(self, gates) -> jax.Array:
    return 1.0 - self.kept_kernel_weights(gates) / self.total_kernel

  def lam(self, step) -> jax.Array:
    return self.strength * jnp.clip((step - self.warmup_steps) / self.ramp_steps, 0.0, 1.0)

  def regularizer(self, state, seed, step=0):
    soft = self.soft(state)
    w = {g: self.weights[g] / soft[g].size for g in self.gate_paths}
    m = sum(jnp.sum(w[g] * soft[g]) for g in self.gate_paths)
    spread = sum(jnp.sum(w[g] * jnp.abs(soft[g] - m)) for g in self.gate_paths)
    polar = self.t * m - spread
    poles = sum(jnp.sum(w[g] * (0.5 - jnp.abs(soft[g] - 0.5))) for g in self.gate_paths)
    # The exact sparsity of the 0/1 gates the forward pass uses (straight-through
    # to the soft ones): soft gates could meet the budget while all stay open.
    miss = self.sparsity_of(self.hard(state)) - self.sparsity
    return (self.lam(step) * (polar + self.polarize * poles + self.budget * miss ** 2)
            + self.source.regularizer(state['source'], seed, step))

  def metrics(self, state, seed, step=0) -> dict[str, jax.Array]:
    """Logged every step: sparsity (0/1 gates, exact), gate polarization."""
    soft = self.soft(state)
    hard = {g: (s > self.threshold).astype(jnp.float32) for g, s in soft.items()}
    allg = jnp.concatenate([s.reshape(-1) for s in soft.values()])
    open_ = allg > self.threshold
    common = jnp.sum(jnp.where(open_, allg, 0.0)) / jnp.maximum(1, jnp.sum(open_))
    return {'gate_sparsity': self.sparsity_of(hard), 'gate_soft_sparsity': self.sparsity_of(soft),
            'gate_near0': jnp.mean(allg < 0.1),
            'gate_near_common': jnp.mean(jnp.abs(allg - common) < 0.1),
            'gate_between': jnp.mean((allg >= 0.1) & (jnp.abs(allg - common) >= 0.1)),
            'gate_lambda': self.lam(step)}

  def export(self, state, seed):
    out = {f'source/{k}': v for k, v in self.source.export(state['source'], seed).items()}
    out.update({f'mask/{g}': s > self.threshold for g, s in self.soft(state).items()})
    return out

  def from_export(self, arrays, seed):
    src = {k[7:]: v for k, v in arrays.items() if k.startswith('source/')}
    params = flatten(self.source.from_export(src, seed))
    for g in self.gate_paths:
      params[g] = jnp.asarray(arrays[f'mask/{g}'], self.leaves[g].dtype)
    return unflatten({p: params[p] for p in self.leaves})

  def storage_bits(self):
    bits = dict(self.source.storage_bits())
    bits['gate_bits'] = sum(size(self.leaves[g].shape) for g in self.gate_paths)
    return bits


def open_gates(params, structure) -> dict[str, np.ndarray]:
  """The 0/1 effective gates (bool arrays) of a gated model's params."""
  flat = flatten(params)
  raw = {g: np.asarray(flat[g]) > 0.5 for g in structure.gates}
  eff = dict(raw)
  for b, inner in structure.any_of.items():
    eff[b] = raw[b] & raw[inner].any()
  return eff

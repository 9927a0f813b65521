"""Polarization gating (Zhi et al. 2023, arXiv 2302.10798): binary gates over
channels and residual branches, trained in one pass with the weights, pushed
to a user-set sparsity by a polarization regularizer; the result is sliced
physically (``pemn_jax.gating.surgery``).

The model is built with ``gates=True``: it multiplies chosen activations by
``gate`` params and describes, in its ``gate_structure()``, which weights each
gate removes. This parameterization trains one real ``gamma`` per gate and
materializes the gate leaves as ``straight_through(1[clip(gamma, 0, 1) >
threshold], clip(gamma, 0, 1))``: exactly 0/1 in the forward pass; every other
leaf comes from ``source`` (dense by default; any parameterization). The
regularizer (our construction; the paper's code is not public), with ``s``
the target fraction of kernel weights removed and ``w_j`` the share of
kernel weights gate j switches:

    R = lambda(step) * [ t * m - sum_j w_j |g~_j - m|              (Zhuang)
                         + rho * sum_j w_j (1/2 - |g~_j - 1/2|)     (poles)
                         + mu * (S(g) - s)^2 ],                    (budget)
    m = sum_j w_j g~_j,  t = 4 s - 2,

``S`` the exact fraction the 0/1 gates remove (straight-through to the soft
gates); ``lambda`` is 0 for ``warmup`` and ramps to ``strength`` over
``ramp`` (fractions of the run). Why each term, and the measurements behind
rho=3: docs/polarization.md.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax.ops.topk import straight_through
from pemn_jax.params import sections
from pemn_jax.params.base import Composed, Parameterization, size
from pemn_jax.pytrees import flatten, unflatten

GATES = r'(^|/)gate$'


def _is_kernel(path: str) -> bool:
  return path.rsplit('/', 1)[-1] == 'kernel'


class Gated(Composed):
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
    super().__init__(source, target)
    for name, v, lo, hi in [('sparsity', sparsity, 0.0, 0.99), ('strength', strength, 0, 1e6),
                            ('budget', budget, 0, 1e6), ('polarize', polarize, 0, 1e6),
                            ('warmup', warmup, 0, 1),
                            ('ramp', ramp, 0, 1), ('threshold', threshold, 0.01, 0.99)]:
      if not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f'gated {name} must be in [{lo}, {hi}], got {v!r}')
    self.model = model
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

  def own_hyperparams(self) -> dict:
    """The target sparsity and its polarization threshold ``t = 4 s - 2``."""
    return {'sparsity': np.float32(self.sparsity), 't': np.float32(self.t)}

  def use_hyperparams(self, own: dict):
    self.sparsity, self.t = own['sparsity'], own['t']

  def init(self, key):
    return {'source': self.source.init(key),
            'gates': unflatten({g: jnp.ones(self.leaves[g].shape, jnp.float32)
                                for g in self.gate_paths})}

  def own_project(self, state):
    """Gates stay in [0, 1] (projected gradient descent, as Zhuang et al. keep
    their scaling factors in [0, a]): a gate pushed past 1 would otherwise sit
    where the clip has no gradient and never close again."""
    return {'gates': jax.tree.map(lambda g: jnp.clip(g, 0.0, 1.0), state['gates'])}

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

  def own_regularizer(self, state, seed, step):
    del seed
    soft = self.soft(state)
    w = {g: self.weights[g] / soft[g].size for g in self.gate_paths}
    m = sum(jnp.sum(w[g] * soft[g]) for g in self.gate_paths)
    spread = sum(jnp.sum(w[g] * jnp.abs(soft[g] - m)) for g in self.gate_paths)
    polar = self.t * m - spread
    poles = sum(jnp.sum(w[g] * (0.5 - jnp.abs(soft[g] - 0.5))) for g in self.gate_paths)
    # The exact sparsity of the 0/1 gates the forward pass uses (straight-through
    # to the soft ones): soft gates could meet the budget while all stay open.
    miss = self.sparsity_of(self.hard(state)) - self.sparsity
    return self.lam(step) * (polar + self.polarize * poles + self.budget * miss ** 2)

  def own_metrics(self, state, seed, step) -> dict[str, jax.Array]:
    """Logged every step: sparsity (0/1 gates, exact), gate polarization."""
    del seed
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

  TOLERANCE = 0.02  # a run meets its sparsity within 2 points of it

  def own_goals(self, state, seed):
    """The exact sparsity of the 0/1 gates against the one asked."""
    del seed
    reached, asked = float(self.sparsity_of(self.hard(state))), float(self.sparsity)
    return [{'what': 'gate sparsity', 'asked': asked, 'reached': reached,
             'met': reached >= asked - self.TOLERANCE,
             'hint': f'raise param.strength (now {self.strength:g}) or param.budget, or '
                     'train longer; export --slice removes only what closed gates switch off'}]

  def own_export(self, state, seed):
    del seed
    return sections.nest(sections.MASK, {g: s > self.threshold
                                         for g, s in self.soft(state).items()})

  def apply_export(self, source_params, arrays, seed):
    del seed
    params, gates = flatten(source_params), sections.part(sections.MASK, arrays)
    for g in self.gate_paths:
      params[g] = jnp.asarray(gates[g], self.leaves[g].dtype)
    return unflatten({p: params[p] for p in self.leaves})

  def own_storage_bits(self):
    return {'gate_bits': sum(size(self.leaves[g].shape) for g in self.gate_paths)}


"""Learned masks over any weight source (edge-popup, supermask).

``Masked(source)`` multiplies the selected leaves of ``source.materialize`` by
a mask computed from per-leaf trainable scores:

* ``edge_popup``: keep the top ``keep`` fraction of ``|score|`` in each leaf
  (exactly ``n - int((1 - keep) * n)`` ones, the reference's count);
  straight-through gradient to ``|score|``.
* ``supermask``: ``p = sigmoid(score)``; a Bernoulli sample, straight-through
  gradient to ``p``. Training samples with the step's ``rng``. Evaluation
  (``rng=None``) follows ``eval``: ``'sample'`` (the reference: its eval is
  stochastic) draws one mask from a key derived from ``(seed, eval_seed)`` --
  deterministic, and the mask a model file stores; ``'threshold'`` keeps
  ``p > 0.5``; ``'expected'`` averages the predictions of ``eval_samples``
  sampled networks (``eval_rngs``; a model file stores the eval key's sample).

The source can be frozen random weights (``Prototype(mode='dense')``: the
edge-popup baseline), PEMN prototypes, an RPG ring, or dense trained weights.
Its ``rest`` policy decides whether norm scales/biases are trained (PEMN) or
fixed (edge-popup).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax.ops.segments import Segments
from pemn_jax.ops.spmd import shard_flat
from pemn_jax.ops.topk import num_kept, straight_through, topk_mask
from pemn_jax.params import sections
from pemn_jax.params.base import KERNELS, Composed, Parameterization, fan_in, leaf_key, size
from pemn_jax.pytrees import flatten, unflatten

KINDS = ('edge_popup', 'supermask')
EVALS = ('sample', 'threshold', 'expected')


class Masked(Composed):
  """Per-leaf learned masks composed over another parameterization."""

  default_source = {'name': 'prototype', 'mode': 'dense'}
  traced = ('keep',)
  _kept = None  # per-leaf kept counts from with_hyperparams (traced), else from keep

  def __init__(self, source: Parameterization, keep: float = 0.5, select: str = KERNELS,
               kind: str = 'edge_popup', eval: str = 'sample', eval_samples: int = 8,
               eval_seed: int = 0):
    super().__init__(source)
    if kind not in KINDS:
      raise ValueError(f'mask kind must be one of {KINDS}, got {kind!r}')
    if kind == 'edge_popup' and not 0.0 < keep <= 1.0:
      raise ValueError(f'mask keep fraction must be in (0, 1], got {keep}')
    if eval not in EVALS:
      raise ValueError(f'mask eval must be one of {EVALS}, got {eval!r}')
    if not isinstance(eval_samples, int) or not 1 <= eval_samples <= 1024:
      raise ValueError(f'mask eval_samples must be an integer in [1, 1024], got {eval_samples!r}')
    self.keep, self.kind, self.selection = float(keep), kind, select
    self.eval, self.eval_samples, self.eval_seed = eval, eval_samples, int(eval_seed)
    self.masked = self.select(select)
    if not self.masked:
      raise ValueError(f'mask select={select!r} matches no leaf; leaves: {sorted(self.leaves)}')
    self.segments = Segments([size(self.leaves[p].shape) for p in self.masked])

  def init(self, key):
    k_src, k_scores = jax.random.split(key)
    # PyTorch's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    u = jax.random.uniform(k_scores, (self.segments.total,), jnp.float32, -1.0, 1.0)
    shapes = [self.leaves[p].shape for p in self.masked]
    scores = {p: x / fan_in(x.shape) ** 0.5
              for p, x in zip(self.masked, self.segments.split(u, shapes), strict=True)}
    return {'source': self.source.init(k_src), 'scores': unflatten(scores)}

  @property
  def selected(self):
    return list(self.masked)

  def own_hyperparams(self) -> dict:
    """Edge-popup's per-leaf kept counts ``n - int((1 - keep) n)`` (Python
    floats, as the untraced masks count them) under ``'kept'``."""
    if self.kind != 'edge_popup':
      return {}
    return {'kept': {p: np.int32(num_kept(int(n), self.keep))
                     for p, n in zip(self.masked, self.segments.sizes, strict=True)}}

  def use_hyperparams(self, own: dict):
    self._kept = own['kept']

  def _eval_key(self, seed):
    return jax.random.fold_in(leaf_key(seed, 'mask/eval'), self.eval_seed)

  def eval_rngs(self, seed):
    if self.kind == 'supermask' and self.eval == 'expected':
      return jax.random.split(self._eval_key(seed), self.eval_samples)
    return None

  def masks(self, state, rng=None, seed=0) -> dict[str, jax.Array]:
    """The (straight-through) masks of the masked leaves, ``{path: mask}``.

    Args:
      state: this parameterization's state.
      rng: a key (training: a supermask samples with it), or None (evaluation).
      seed: the model seed (a supermask's evaluation key derives from it).
    Returns:
      ``{path: 0/1 float array}``.
    """
    scores = flatten(state['scores'])
    uniform = None  # a supermask's Bernoulli draws: one stream over all leaves
    if self.kind == 'supermask' and not (rng is None and self.eval == 'threshold'):
      key = self._eval_key(seed) if rng is None else rng
      uniform = shard_flat(jax.random.uniform(key, (self.segments.total,), jnp.float32))
    out = {}
    for p, start, n in zip(self.masked, self.segments.starts, self.segments.sizes, strict=True):
      # Each leaf on its own (flat, laid out per the generation sharding): no
      # concatenation of all leaves that a device would have to hold whole.
      s = shard_flat(scores[p].reshape(-1))
      if self.kind == 'edge_popup':
        # ranked by |scores|, read from the scores (no array of |scores| made)
        hard = (topk_mask(s, self.keep, magnitude=True) if self._kept is None else
                topk_mask(s, kept=self._kept[p], magnitude=True))
        m = straight_through(hard, jnp.abs(s))
      else:
        prob = jax.nn.sigmoid(s)
        # jax.random.bernoulli(key, p) is uniform(key, p.shape) < p.
        hard = prob > 0.5 if uniform is None else uniform[int(start):int(start + n)] < prob
        m = straight_through(hard.astype(prob.dtype), prob)
      out[p] = m.reshape(self.leaves[p].shape)
    return out

  def _apply(self, source_params, masks):
    params = flatten(source_params)
    for p, m in masks.items():
      params[p] = (params[p] * m).astype(self.leaves[p].dtype)
    return unflatten(params)

  def materialize(self, state, seed, rng=None):
    src_rng, mask_rng = (None, None) if rng is None else jax.random.split(rng)
    source_params = self.source.materialize(state['source'], seed, src_rng)
    return self._apply(source_params, self.masks(state, mask_rng, seed))

  def own_export(self, state, seed):
    masks = {p: m > 0.5 for p, m in self.masks(state, None, seed).items()}
    return sections.nest(sections.MASK, masks)

  def apply_export(self, source_params, arrays, seed):
    masks = {p: jnp.asarray(v, jnp.float32)
             for p, v in sections.part(sections.MASK, arrays).items()}
    if set(masks) != set(self.masked):
      raise ValueError(f'file has masks for {sorted(masks)}, the model needs {self.masked}')
    return self._apply(source_params, masks)

  def own_storage_bits(self):
    return {'mask_bits': sum(size(self.leaves[p].shape) for p in self.masked)}

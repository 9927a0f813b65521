"""RPG: a trainable ring of D floats generates the selected leaves.

The generated leaves (sorted path order) are laid end to end into T elements.
Element t reads ring position ``idx(t)`` with a random sign; leaf i is scaled
by a constant ``c_i``. Two index assignments, both derived from the seed
inside jit (no index table is stored):

* ``assign='global'`` (the reference code's, the default): the multiset that
  holds every ring position ``floor(T/D)`` times plus ``T mod D`` distinct
  positions once more is randomly permuted and cut into the leaves in order.
  Here: ``u = pi_T(t)`` for a keyed permutation of ``[0, T)``; ``idx = u mod D``
  when ``u < D*floor(T/D)``, else ``sigma_D(u - D*floor(T/D))`` for a keyed
  permutation ``sigma_D`` of ``[0, D)`` (the extra positions).
* ``assign='window'``: leaf i reads ``(offset_i + pi_i(j)) mod D`` -- a
  contiguous cyclic window of the ring in a per-leaf random order.

Either way each ring position is used ``floor(T/D)`` or ``ceil(T/D)`` times.

Scale (``fan='out'``, ``ring_std=sqrt(2/4608)``: the reference code's
convention): the ring starts N(0, ring_std^2) and leaf i is multiplied by
``c_i = sqrt(gain / fan_i) / ring_std``, so the generated weights start at
Kaiming (He) variance over fan-out, and an SGD step on the ring moves weight i by
``c_i^2`` times what the same step would move a dense weight -- O(1) for every
layer, as in a dense network. (A N(0, 1) ring times ``sqrt(2/fan_in)``,
``ring_std=1, fan='in'``, starts at the same variance but moves the weights
``2/fan_in`` times slower: they barely train at a dense learning rate.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pemn_jax.ops import spmd
from pemn_jax.ops.hashing import as_seed, mix, path_id
from pemn_jax.ops.permutation import permute_indices, permute_segments
from pemn_jax.ops.segments import Segments
from pemn_jax.ops.spmd import shard_flat
from pemn_jax.params.base import KERNELS, Split, init_std, size

# The reference initializes its ring as a (512, -1, 3, 3) tensor with Kaiming
# normal over fan-out: std sqrt(2 / (512 * 3 * 3)).
REFERENCE_RING_STD = math.sqrt(2.0 / 4608)
ASSIGNMENTS = ('global', 'window')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _ring_values(ring, seed, param, sharding):
  """``ring[pos] * sign * constant`` of every generated element (flat); its
  gradient is ``param.ring_gradient`` (gathers, no scatter). ``sharding``:
  the generation sharding active when it was traced (the backward pass is
  traced after that context has ended)."""
  pos, sign, ids = param.flat_indices(seed)
  return shard_flat(jnp.take(ring, pos, axis=0) * param._coefficients(sign, ids))


def _ring_values_fwd(ring, seed, param, sharding):
  return _ring_values(ring, seed, param, sharding), seed


def _ring_values_bwd(param, sharding, seed, g):
  with spmd.generation(sharding):
    if sharding is not None:
      # The inverse permutation depends on the seed alone; tied to g, its
      # loop (whose condition is an all-reduce over the devices) runs after
      # the forward's: two such loops free to run in either order deadlocked
      # XLA:CPU's devices (one in each).
      g, seed = jax.lax.optimization_barrier((g, seed))
      return param.ring_gradient(g, seed), None
    # Chosen per platform when lowered: XLA:CPU's scatter-add is fast (one
    # Feistel evaluation instead of two); TPU and GPU get the gathers.
    return jax.lax.platform_dependent(g, seed, cpu=param.scatter_gradient,
                                      default=param.ring_gradient), None


_ring_values.defvjp(_ring_values_fwd, _ring_values_bwd)


def resolve_dof(dof: float, num_params: int) -> int:
  """D from an absolute count (>= 1) or a fraction of N (0 < dof < 1)."""
  if not isinstance(dof, (int, float)) or isinstance(dof, bool) or not math.isfinite(dof) \
      or dof <= 0:
    raise ValueError(f'ring dof must be a finite number > 0 (a count, or a fraction of N), '
                     f'got {dof!r}')
  d = int(dof) if dof >= 1 else int(round(dof * num_params))
  if dof >= 1 and d != dof:
    raise ValueError(f'ring dof >= 1 must be an integer count, got {dof}')
  return max(1, d)


class Ring(Split):
  """Recurrent Parameter Generator ring.

  Args:
    target: the model's params pytree of shapes.
    dof: D, the ring length: a count (>= 1) or a fraction of N (all params).
      Must not exceed the number of generated weights.
    select: the leaves generated from the ring (a regex or a named selection:
      ``'@stages'`` = every kernel but the stem and the classifier, as the
      reference; ``'@kernels'`` = every kernel).
    rest: the other leaves: ``'train'`` (ordinary trained params) or ``'fixed'``.
    gain: Kaiming gain of the generated weights' initial variance.
    fan: ``'out'`` (reference) or ``'in'``: the fan in that variance.
    ring_std: the ring's initial std; leaf scales are relative to it.
    assign: ``'global'`` (reference) or ``'window'`` index assignment.
  """

  def __init__(self, target, dof: float = 0.01, select: str = KERNELS,
               rest: str = 'train', gain: float = 2.0, fan: str = 'out',
               ring_std: float = REFERENCE_RING_STD, assign: str = 'global'):
    super().__init__(target, select=select, rest=rest, gain=gain)
    if assign not in ASSIGNMENTS:
      raise ValueError(f'ring assign must be one of {ASSIGNMENTS}, got {assign!r}')
    if not (isinstance(ring_std, (int, float)) and math.isfinite(ring_std) and ring_std > 0):
      raise ValueError(f'ring_std must be a finite number > 0, got {ring_std!r}')
    self.dof = resolve_dof(dof, self.num_params)
    self.fan, self.ring_std, self.assign = fan, float(ring_std), assign
    self.offsets, t = {}, 0
    for p in self.generated:
      self.offsets[p] = t % self.dof
      t += size(self.leaves[p].shape)
    self.num_generated = t
    if self.dof > t:
      raise ValueError(f'ring dof={self.dof} exceeds the {t} generated weights (select='
                       f'{select!r}): a ring longer than what it generates is never fully used')
    self.segments = Segments([size(self.leaves[p].shape) for p in self.generated])
    if self.dof + max(size(self.leaves[p].shape) for p in self.generated) >= 2**32:
      raise ValueError('ring dof + largest leaf size must be < 2**32')
    for p in self.generated:
      self.scale(p)  # fails early on a bad fan

  def init(self, key):
    k_ring, k_rest = jax.random.split(key)
    return {'ring': self.ring_std * jax.random.normal(k_ring, (self.dof,), jnp.float32),
            'rest': self.init_rest(k_rest)}

  def _positions(self, seed, ids):
    """Ring position of every generated element (uint32, flat)."""
    seg, d = self.segments, self.dof
    if self.assign == 'window':
      pos = permute_segments(seg, self.generated, seed, ids=ids)
      pos = pos + seg.per_segment([self.offsets[p] for p in self.generated], jnp.uint32)[ids]
      return pos % jnp.uint32(d)
    t = self.num_generated
    full = d * (t // d)                      # positions of the floor(T/D) full copies
    u = permute_indices(shard_flat(jnp.arange(t, dtype=jnp.uint32)), t, seed,
                        'ring/global')
    if full == t:
      return u % jnp.uint32(d)
    extra = permute_indices(jnp.clip(u, full, t - 1) - jnp.uint32(full), d, seed, 'ring/extra')
    return jnp.where(u < full, u % jnp.uint32(d), extra)

  def flat_indices(self, seed):
    """Ring position and sign of every generated element (leaves in order,
    flattened). Computed from the seed on each call, never stored."""
    seg = self.segments
    ids = seg.ids()
    pos = self._positions(seed, ids)
    lids = seg.per_segment([path_id(p) for p in self.generated], jnp.uint32)[ids]
    bits = mix(as_seed(seed), lids, 0x5167, seg.local(ids)) >> 31
    return pos.astype(jnp.int32), 1.0 - 2.0 * bits.astype(jnp.float32), ids

  def scale(self, path: str) -> float:
    """The constant leaf ``path`` is multiplied by."""
    return init_std(path, self.leaves[path].shape, self.gain, self.fan) / self.ring_std

  def _coefficients(self, sign, ids):
    """Sign times leaf constant of every generated element."""
    scale = self.segments.per_segment([self.scale(p) for p in self.generated], jnp.float32)
    return sign * scale[ids]

  def generate(self, state, seed):
    ring = state['ring']
    if ring.shape != (self.dof,):
      raise ValueError(f'ring state has shape {ring.shape}, expected ({self.dof},)')
    flat = _ring_values(ring, as_seed(seed), self, spmd.active())
    shapes = [self.leaves[p].shape for p in self.generated]
    return dict(zip(self.generated, self.segments.split(flat, shapes), strict=True))

  def scatter_gradient(self, cotangent, seed):
    """The ring's gradient as XLA transposes the gather: a scatter-add of T
    updates into D slots (fast on CPU; see ``ring_gradient``)."""
    pos, sign, ids = self.flat_indices(seed)
    w = cotangent * self._coefficients(sign, ids)
    return jnp.zeros((self.dof,), w.dtype).at[pos].add(w)

  def ring_gradient(self, cotangent, seed):
    """The ring's gradient given the generated elements' (flat) cotangent.

    The transpose of the gather ``ring[pos]`` is a scatter-add of T updates
    into D slots (a known TPU pathology). Here it is gathers and contiguous
    sums instead: the cotangent (times sign and leaf constant) is permuted by
    the *inverse* permutation -- computed from the seed as cheaply as the
    permutation -- into ring order, where each ring position's floor(T/D) or
    ceil(T/D) entries are a row of a (T/D, D) reshape (``window``: each
    leaf's inverse, then the same reshape).
    """
    seg, d, t = self.segments, self.dof, self.num_generated
    _, sign, ids = self.flat_indices(seed)
    w = cotangent * self._coefficients(sign, ids)
    if self.assign == 'window':  # element start_i + pi_i(j) sits at its own index mod D
      src = seg.iota(jnp.uint32) - seg.local(ids) + permute_segments(
          seg, self.generated, seed, ids=ids, inverse=True)
      v = shard_flat(jnp.take(w, src.astype(jnp.int32), axis=0))
      return jnp.pad(v, (0, -t % d)).reshape(-1, d).sum(0)
    full = d * (t // d)
    src = permute_indices(shard_flat(jnp.arange(t, dtype=jnp.uint32)), t, seed, 'ring/global',
                          inverse=True)
    v = shard_flat(jnp.take(w, src.astype(jnp.int32), axis=0))  # v[u] = w[pi^-1(u)]
    grad = v[:full].reshape(t // d, d).sum(0)
    if full < t:  # u in [full, T): ring position sigma_D(u - full)
      e = permute_indices(jnp.arange(d, dtype=jnp.uint32), d, seed, 'ring/extra', inverse=True)
      extra = jnp.take(v, (full + jnp.minimum(e, t - full - 1)).astype(jnp.int32), axis=0)
      grad = grad + jnp.where(e < t - full, extra, 0.0)
    return grad

  def export_generated(self, state, seed):
    return {'ring': state['ring']}

  def generate_from_export(self, arrays, seed):
    return self.generate({'ring': arrays['ring']}, seed)

  def storage_bits(self):
    return {'ring_floats': 32 * self.dof, **self.rest_bits()}

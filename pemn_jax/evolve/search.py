"""Directed-evolution sparsification (Franca-Neto 2022, arXiv 2206.05859).

The trained network is the teacher; the student starts as its copy. Layer by
layer, toward that layer's sparsity target, each *generation*:

1. a population of ``population`` candidate zero-sets is drawn: each zeros
   ``k`` still-alive weights sampled without replacement with probability
   proportional to ``exp(-|w| / (tau * mean|w_alive|))`` -- biased to small
   magnitudes (Gumbel-top-k: exactly k of the alive weights; the Gumbel noise
   comes from the counter hash of ``pemn_jax.ops``, keyed per candidate);
2. every candidate is evaluated: the KL divergence of the student's softmax
   from the teacher's on a fixed calibration batch. Drawing and evaluating the
   whole population is ONE jitted call, ``vmap``-ed over the candidates (and
   sharded over a ``pop`` mesh axis when there are several devices);
3. the candidate that changes the output least is kept: its weights are zeroed
   for good;
4. the group size adapts: ``k = ceil(rate * remaining)``, the rate grows by
   1.25x after a generation whose divergence increase stayed below
   ``tolerance``, and halves after one above it;

until the layer has exactly ``n - int(s * n)`` weights left. Between layers,
an optional short distillation fine-tunes the survivors (KL to the teacher on
training batches, zeroed weights kept at zero). The paper's code is not
public: these are our choices, documented in docs/directed_evolution.md.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pemn_jax.ops.hashing import mix
from pemn_jax.ops.topk import topk_mask
from pemn_jax.pytrees import flatten, unflatten


def teacher_logp(model, model_state, teacher_params, images):
  """The teacher's log-probabilities on ``images``."""
  return jax.nn.log_softmax(model.apply({'params': teacher_params, **model_state}, images,
                                        train=False))


def kl_fn(model, model_state, images, teacher_logp):
  """``params -> mean KL(teacher || student)`` on a fixed batch."""
  def kl(params):
    logp = jax.nn.log_softmax(model.apply({'params': params, **model_state}, images,
                                          train=False))
    return jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), axis=-1))
  return kl


class Evolution:
  """The population search of one student network.

  Args:
    model: the Flax model.
    model_state: its batch statistics (fixed).
    images: the calibration batch.
    teacher_params: the trained params.
    population: candidates per generation.
    tau: magnitude bias (smaller = more strongly toward small weights).
    tolerance: the KL increase per generation under which the group grows.
  """

  def __init__(self, model, model_state, images, teacher_params, population: int = 32,
               tau: float = 0.1, tolerance: float = 1e-3):
    self.model, self.model_state, self.images = model, model_state, images
    self.population, self.tau, self.tolerance = int(population), float(tau), float(tolerance)
    self.teacher_logp = jax.jit(lambda p: teacher_logp(model, model_state, p, images))(
        teacher_params)
    self.kl = jax.jit(kl_fn(model, model_state, images, self.teacher_logp))
    self._pop, self._one = {}, {}
    n = jax.device_count()
    self.mesh = (jax.make_mesh((n,), ('pop',), axis_types=(jax.sharding.AxisType.Auto,))
                 if n > 1 and self.population % n == 0 else None)

  def candidate_kl(self, path: str, shape):
    """``(params, kernel) -> KL`` with leaf ``path`` replaced (jitted, cached)."""
    if path not in self._one:
      kl = kl_fn(self.model, self.model_state, self.images, self.teacher_logp)

      def one(params, kernel):
        flat = flatten(params)
        flat[path] = kernel.reshape(shape)
        return kl(unflatten(flat))
      self._one[path] = jax.jit(one)
    return self._one[path]

  def population_fn(self, path: str, shape):
    """``(params, alive, keys, k) -> (zero-sets (P, n), KLs (P,))``: draws and
    evaluates a whole population in one jitted, vmapped call."""
    if path in self._pop:
      return self._pop[path]
    one = self.candidate_kl(path, shape)
    tau = self.tau

    def pop(params, alive, keys, k):
      w = flatten(params)[path].reshape(-1)
      a = jnp.abs(w)
      scale = jnp.sum(jnp.where(alive, a, 0.0)) / jnp.maximum(1, jnp.sum(alive))
      base = -a / (tau * scale + 1e-30)

      def draw(word):  # Gumbel noise from the counter hash: ~9x cheaper than threefry here
        bits = mix(word, jnp.arange(w.size, dtype=jnp.uint32)) >> 8
        u = (bits.astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
        score = jnp.where(alive, base - jnp.log(-jnp.log(u)), -jnp.inf)
        return topk_mask(score, kept=k) > 0
      zero_sets = jax.vmap(draw)(jax.vmap(lambda key: jax.random.bits(key, (), jnp.uint32))(keys))
      kls = jax.vmap(lambda z: one(params, jnp.where(z, 0.0, w)))(zero_sets)
      return zero_sets, kls

    if self.mesh is not None:
      from jax.sharding import NamedSharding
      from jax.sharding import PartitionSpec as PS
      repl, shard = NamedSharding(self.mesh, PS()), NamedSharding(self.mesh, PS('pop'))
      fn = jax.jit(pop, in_shardings=(repl, repl, shard, repl), out_shardings=(shard, shard))
    else:
      fn = jax.jit(pop)
    self._pop[path] = fn
    return fn

  def generation(self, params, masks: dict, path: str, want_alive: int, rate: float, key,
                 current_kl: float):
    """One generation on layer ``path``; returns (params, masks, rate, kl, info)."""
    shape = flatten(params)[path].shape
    alive = masks[path].reshape(-1)
    remaining = int(alive.sum()) - want_alive
    k = max(1, min(remaining, math.ceil(rate * remaining)))
    keys = jax.random.split(key, self.population)
    zero_sets, kls = self.population_fn(path, shape)(params, jnp.asarray(alive), keys,
                                                      jnp.int32(k))
    kls = np.asarray(kls)
    best = int(np.argmin(kls))
    zero = np.asarray(zero_sets[best])
    new_alive = alive & ~zero
    flat = flatten(params)
    flat[path] = jnp.where(jnp.asarray(new_alive).reshape(shape), flat[path], 0.0)
    masks = {**masks, path: new_alive.reshape(shape)}
    increase = float(kls[best]) - current_kl
    rate = min(0.5, rate * 1.25) if increase < self.tolerance else max(1 / 4096, rate / 2)
    info = {'layer': path, 'k': k, 'alive': int(new_alive.sum()), 'want': want_alive,
            'kl': float(kls[best]), 'kl_worst': float(kls.max()), 'evaluations': len(kls)}
    return unflatten(flat), masks, rate, float(kls[best]), info


class Distiller:
  """Distillation of a pruned student toward the teacher's softmax: Adam on
  the survivors, zeroed weights kept exactly zero. One jitted step, compiled
  once and reused by every call (the search calls it between generations).

  Args:
    model: the Flax model.
    model_state: its batch statistics (fixed).
    teacher_params: the trained params.
    lr: Adam's learning rate.
  """

  def __init__(self, model, model_state, teacher_params, lr: float = 1e-4):
    self.model_state, self.teacher = model_state, teacher_params
    self.tx = tx = optax.adam(lr)

    def masked(tree, mask_tree):
      flat, mflat = flatten(tree), flatten(mask_tree)
      return unflatten({p: v * mflat[p] if p in mflat else v for p, v in flat.items()})

    def step(params, opt, images, teacher, model_state, mask_tree):
      loss = kl_fn(model, model_state, images, teacher_logp(model, model_state, teacher, images))
      grads = masked(jax.grad(loss)(params), mask_tree)
      updates, opt = tx.update(grads, opt, params)
      return masked(optax.apply_updates(params, updates), mask_tree), opt
    self._step = jax.jit(step)

  def __call__(self, params, masks: dict, batches):
    """Fine-tunes ``params`` (zeroed where ``masks`` are False) on ``batches``
    (an iterable of images), from a fresh Adam state. Returns the params."""
    opt = self.tx.init(params)
    mask_tree = unflatten({p: jnp.asarray(m, jnp.float32) for p, m in masks.items()})
    for images in batches:
      params, opt = self._step(params, opt, images, self.teacher, self.model_state, mask_tree)
    return params


@jax.custom_vjp
def codebook_lookup(codebook, symbols):
  """``codebook[symbols]``, whose gradient per level is a masked sum over the
  weights (one contiguous reduce per level) instead of a gather's transpose,
  a scatter-add of every weight into the codebook (N-sized on accelerators)."""
  return codebook[symbols]


def _lookup_fwd(codebook, symbols):
  return codebook[symbols], (codebook, symbols)


def _lookup_bwd(res, g):
  codebook, symbols = res
  levels = jnp.arange(codebook.shape[0], dtype=symbols.dtype)
  grad = jax.lax.map(lambda j: jnp.sum(jnp.where(symbols == j, g, 0.0)), levels)  # O(N) memory
  return grad.astype(codebook.dtype), np.zeros(symbols.shape, jax.dtypes.float0)


codebook_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class CodebookTuner:
  """Trained quantization (Han et al. 2016, "Deep Compression", section 3.3):
  with every quantized leaf's positions and symbols fixed, distillation toward
  the teacher moves each codebook level by the summed gradient of the weights
  that use it (Adam; ``codebook_lookup``: no scatter); the other params stay
  as they are. One jitted step.

  Args:
    model: the Flax model.
    model_state: its batch statistics (fixed).
    teacher_params: the trained params.
    lr: Adam's learning rate.
  """

  def __init__(self, model, model_state, teacher_params, lr: float = 1e-3):
    self.model_state, self.teacher = model_state, teacher_params
    self.tx = tx = optax.adam(lr)

    def build(codebooks, rest, layout):
      f = dict(rest)
      f.update({p: jnp.where(keep, codebook_lookup(codebooks[p], sym), 0.0)
                for p, (sym, keep) in layout.items()})
      return unflatten(f)

    def step(codebooks, opt, images, teacher, model_state, rest, layout):
      kl = kl_fn(model, model_state, images, teacher_logp(model, model_state, teacher, images))
      updates, opt = tx.update(jax.grad(lambda cb: kl(build(cb, rest, layout)))(codebooks), opt,
                               codebooks)
      return optax.apply_updates(codebooks, updates), opt
    self._step = jax.jit(step)

  def __call__(self, params, layers: dict, batches) -> dict:
    """Fine-tunes the codebooks of ``layers`` (``{leaf path: Quantized}``,
    replacing those leaves of ``params``) on ``batches`` (an iterable of
    images). Returns ``{leaf path: Quantized}`` with the same mask, symbols,
    method and bits and the tuned codebooks."""
    rest = {p: v for p, v in flatten(params).items() if p not in layers}
    layout = {}
    for p, q in layers.items():
      sym = np.zeros(q.mask.size, np.int32)
      sym[np.asarray(q.mask).reshape(-1)] = q.symbols
      layout[p] = (jnp.asarray(sym.reshape(q.mask.shape)), jnp.asarray(q.mask))
    codebooks = {p: jnp.asarray(q.codebook, jnp.float32) for p, q in layers.items()}
    opt = self.tx.init(codebooks)
    for images in batches:
      codebooks, opt = self._step(codebooks, opt, images, self.teacher, self.model_state, rest,
                                  layout)
    return {p: dataclasses.replace(q, codebook=np.asarray(codebooks[p], np.float32))
            for p, q in layers.items()}


def magnitude_masks(params, targets: dict[str, int]) -> dict[str, np.ndarray]:
  """One-shot magnitude pruning: per layer, keep the ``targets[path]`` largest |w|."""
  flat = flatten(params)
  out = {}
  for path, keep in targets.items():
    w = np.asarray(flat[path])
    out[path] = np.asarray(topk_mask(jnp.abs(jnp.asarray(w)), kept=int(keep))) > 0
  return out

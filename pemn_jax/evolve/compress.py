"""Directed evolution of a trained run: prune, fine-tune, quantize, encode.

Post-training, not an SGD loop: it takes the run's trained model from the
trainer's ``train.run.restore`` (its newest good checkpoint, without the
optimizer), and reuses the data pipeline, evaluation (``train.step``),
verified checkpointing (``train.checkpoint.Checkpointer``), the model-file
header and the workdir lock. Its state lives in ``RUN/evolve/<name>/`` and is
checkpointed every few generations: a killed search resumes where it was.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax.cli import Eta
from pemn_jax.data.pipeline import Pipeline
from pemn_jax.evolve import quantize as Q
from pemn_jax.evolve import search as S
from pemn_jax.export import artifact
from pemn_jax.export.model_file import model_header
from pemn_jax.ops.topk import num_kept
from pemn_jax.params import sections
from pemn_jax.pytrees import flatten, unflatten
from pemn_jax.train.checkpoint import Checkpointer
from pemn_jax.train.loop import StopSignals
from pemn_jax.train.pruning import erk_densities
from pemn_jax.train.run import Restored, load_dataset, restore
from pemn_jax.train.step import evaluate_params
from pemn_jax.train.workdir import WorkdirLock, prepare

METHODS = ('de', 'magnitude')


def layer_targets(params, order, sparsity: float,
                  densities: dict[str, float] | None = None) -> dict[str, int]:
  """Weights each kernel keeps: ERK allocation of ``sparsity`` over all kernels
  (small layers keep more), counts by the ``n - int(s * n)`` rule.

  Args:
    params: the teacher's params.
    order: leaf paths in creation order.
    sparsity: fraction of all kernel weights removed.
    densities: ``{kernel path: fraction kept}`` fixed for these kernels; the
      rest of the budget is ERK-allocated over the others (where a kernel's
      positions cost most per kept weight, in sparse layers, the model file
      is smallest with survivors moved to denser layers; a size-vs-accuracy
      choice the caller makes, see docs/directed_evolution.md).
  Returns:
    ``{kernel path: weights kept}`` in creation order.
  """
  flat = flatten(params)
  paths = [p for p in order if p.endswith('kernel') and p in flat]
  sizes = {p: int(np.prod(flat[p].shape)) for p in paths}
  densities = dict(densities or {})
  unknown = sorted(set(densities) - set(paths))
  if unknown:
    raise ValueError(f'densities name {unknown}, which are not kernels of this model; its '
                     f'kernels: {paths}')
  bad = {p: d for p, d in densities.items() if not 0.0 < d <= 1.0}
  if bad:
    raise ValueError(f'a density is a fraction kept in (0, 1]; got {bad}')
  fixed = {p: num_kept(sizes[p], d) for p, d in densities.items()}
  rest = [p for p in paths if p not in fixed]
  left = (1.0 - sparsity) * sum(sizes.values()) - sum(fixed.values())
  n_rest = sum(sizes[p] for p in rest)
  if rest and not 0 < left <= n_rest:
    raise ValueError(f'densities {densities} keep {sum(fixed.values())} weights, which leaves '
                     f'{left:.0f} of the {(1 - sparsity) * sum(sizes.values()):.0f} sparsity '
                     f'{sparsity:g} keeps for the other {n_rest} kernel weights: lower them')
  rest_sparsity = 1.0 - left / n_rest if fixed else sparsity  # (unchanged without densities)
  dens = erk_densities([flat[p].shape for p in rest], rest_sparsity) if rest else []
  fixed.update({p: num_kept(sizes[p], d) for p, d in zip(rest, dens, strict=True)})
  return {p: fixed[p] for p in paths}


def evolve(workdir: str, out: str, method: str = 'de', sparsity: float = 0.9,
           population: int = 32, calibration: int = 1024, tau: float = 0.1,
           tolerance: float = 1e-3, finetune_steps: int = 300, budget_kl: float = 0.01,
           budget_acc: float | None = None, min_bits: int = 2, max_bits: int = 8,
           checkpoint_every: int = 10, seed: int = 0, say=print, max_generations: int = 100_000,
           lr: float = 1e-3, generation_finetune: int = 0, extra_finetune: int = 0,
           log_every: int = 10, densities: dict[str, float] | None = None,
           leftover_bits: int | None = 4, quant_finetune: int = 500) -> dict:
  """Sparsifies, quantizes and encodes ``workdir``'s trained model into ``out``.

  Args:
    workdir: a training run (its newest good checkpoint is the teacher).
    out: the model file to write.
    method: ``'de'`` (directed evolution) or ``'magnitude'`` (one-shot per-layer
      magnitude pruning at the same targets: the baseline).
    sparsity: fraction of kernel weights removed (ERK-allocated over layers).
    population, tau, tolerance: the search (see ``search.Evolution``).
    calibration: images of the calibration batch (the first of a seeded
      order of the teacher's training examples: its ``train_limit``).
    finetune_steps: distillation steps (Adam, ``lr``) after each layer, and
      as many at the end; the baseline gets the same total.
    budget_kl: how much the quantization may add to the pruned student's KL
      (teacher || student) on the calibration batch.
    budget_acc: instead, how many accuracy points (calibration batch) it may
      cost on top of the pruned student's.
    min_bits, max_bits: bits per layer.
    checkpoint_every: generations between checkpoints of the search state.
    seed: of the search's random draws.
    say: progress output.
    max_generations: stop (and checkpoint) after this many generations in all.
    lr: the distillation's learning rate.
    generation_finetune: DE only: distillation steps after every generation
      (the paper's fine-tuning between generations; 0: only between layers).
    extra_finetune: distillation steps added to the final fine-tuning (to
      give a baseline the same total as a DE run: its
      ``generation_distill_steps``).
    log_every: ``say`` a generation's line every this many generations
      (each layer's end is always said).
    densities: ``{kernel path: fraction kept}`` fixed for these kernels, the
      rest ERK-allocated (``layer_targets``).
    leftover_bits: the params that are not pruned kernels (biases, norms) are
      stored as ``2^leftover_bits``-level k-means codebooks (None: float32);
      when that alone breaks the budget, they stay float32.
    quant_finetune: distillation steps of the codebooks after the bit
      allocation (trained quantization, ``search.CodebookTuner``; kept when it
      lowers the calibration fitness; 0: none).
  Returns:
    Sparsity, bits, bytes, timings and evaluation counts, and ``params``: the
    quantized params the file holds (those the bit search evaluated).
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  # What shapes a search, saved with its state: a rerun with other values
  # must not silently resume (or overwrite) the saved one.
  settings = {'population': population, 'calibration': calibration, 'tau': tau,
              'tolerance': tolerance, 'finetune_steps': finetune_steps, 'seed': seed, 'lr': lr,
              'generation_finetune': generation_finetune, 'extra_finetune': extra_finetune,
              'densities': dict(densities) if densities else None}
  run = restore(workdir, say=say)
  settings['teacher_step'] = run.step  # (a search resumed on another step's teacher mixes two)
  search = _Search(run, method, sparsity, settings, say, log_every)
  t0 = time.time()
  if not search.prune(checkpoint_every, max_generations):
    return {'finished': False, 'generation': search.prog['generation']}
  return {**_encode(run, search, out, budget_kl, budget_acc, min_bits, max_bits, leftover_bits,
                   quant_finetune),
          'seconds': time.time() - t0}


class _Search:
  """One pruning search of a run's trained model: its state (student
  params, masks, progress), checkpointed in ``RUN/evolve/<method>-s<sparsity>``."""

  def __init__(self, run: Restored, method: str, sparsity: float, settings: dict, say,
               log_every: int = 1):
    self.method, self.settings, self.say = method, settings, say
    self.log_every = max(1, int(log_every))
    self.model, self.model_state = run.model, run.train_state.model_state
    self.teacher = run.params()
    config = run.config
    ds = load_dataset(config, 'train')
    # The teacher's training examples (its train_limit), read into memory once:
    # the calibration batch is the first of a seeded order, distillation
    # batches (128) follow that order.
    n = min(ds.num_examples, config.train_limit or ds.num_examples)
    self.pipe = Pipeline(ds, min(128, n), settings['seed'], limit=n)
    images, labels = self.pipe.examples(self.pipe.order(0)[:min(settings['calibration'], n)])
    self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)
    self.state_dir = prepare(os.path.join(run.workdir, 'evolve', f'{method}-s{sparsity:g}'))
    self.targets = layer_targets(self.teacher, run.param.order, sparsity,  # creation order
                                 settings['densities'])
    self.evo = S.Evolution(self.model, self.model_state, self.images, self.teacher,
                           settings['population'], settings['tau'], settings['tolerance'])
    self.distill = S.Distiller(self.model, self.model_state, self.teacher, settings['lr'])

  def batches(self, steps: int, what: str | None = None):
    """The next ``steps`` distillation batches (after those already used);
    with ``what``, a progress line with an ETA as they are taken
    (``cli.Eta``: none for a phase shorter than its 5 s)."""
    done = self.prog['finetuned'] + self.prog['gen_finetuned']
    eta = Eta(self.say, what, ' steps') if what else None
    for i in range(steps):
      if eta is not None:
        eta(i, steps)
      yield jnp.asarray(self.pipe.batch(done + i)[0])

  def finetune(self, steps: int, key: str, what: str | None = None):
    if steps > 0:
      self.params = self.distill(self.params, self.masks, self.batches(steps, what))
      self.prog[key] += steps

  def _restore(self, ckpt: Checkpointer):
    flat = flatten(self.teacher)
    masks0 = {p: np.ones(flat[p].shape, bool) for p in self.targets}
    init = {'params': self.teacher, 'masks': {p: m.astype(np.uint8) for p, m in masks0.items()}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            init)
    step, restored, prog = ckpt.restore_latest(abstract)
    settings = self.settings
    if restored is not None and 'settings' in prog:
      saved = prog['settings']  # (searches before teacher_step was saved: not compared)
      differ = {k: (saved.get(k), v) for k, v in settings.items()
                if saved.get(k, v if k == 'teacher_step' else None) != v}
      if differ:
        raise ValueError(
            f'{self.state_dir} holds a {self.method} search with other settings ('
            + ', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in differ.items())
            + '); rerun with the saved values to resume it, or move that directory away to '
            'start a new search (it was left untouched)')
    if restored is None:
      self.params, self.masks = self.teacher, masks0
      self.prog = {'layer': 0, 'generation': 0, 'rate': 0.25, 'kl': 0.0, 'evaluations': 0,
                   'search_seconds': 0.0, 'phase': 'prune', 'finetuned': 0, 'gen_finetuned': 0}
    else:
      self.params = restored['params']
      self.masks = {p: np.asarray(m) > 0 for p, m in restored['masks'].items()}
      self.prog = {'gen_finetuned': 0, **prog['progress']}
      self.say(f'resumed the {self.method} search at generation {self.prog["generation"]} '
               f'({self.state_dir})')
    self.saved = step

  def _save(self, ckpt: Checkpointer):
    p = self.prog
    at = p['generation'] + p['finetuned'] + p['gen_finetuned'] + (p['phase'] != 'prune')
    if at == self.saved:
      return
    ckpt.save(at, {'params': self.params,
                   'masks': {k: m.astype(np.uint8) for k, m in self.masks.items()}},
              {'progress': p, 'settings': self.settings}, force=True)
    self.saved = at

  def prune(self, checkpoint_every: int, max_generations: int) -> bool:
    """Runs (or resumes) the pruning and the final fine-tuning; False when
    stopped by ``max_generations`` or SIGINT/SIGTERM (the search saved)."""
    with WorkdirLock(self.state_dir):
      ckpt = Checkpointer(self.state_dir, keep=2, writer=True)
      try:
        self._restore(ckpt)
        layers = list(self.targets)
        with StopSignals() as stop:  # SIGINT/SIGTERM: save and stop between generations
          self._prune(ckpt, layers, checkpoint_every, max_generations, stop)
          if self.prog['phase'] == 'finetune' and stop.signum is None:
            s = self.settings
            steps = (s['finetune_steps'] * (len(layers) + 1) + s['extra_finetune']
                     - self.prog['finetuned'])
            if steps > 0:
              self.say(f'fine-tuning the pruned student: {steps} distillation steps')
            self.finetune(steps, 'finetuned', 'fine-tuning')
            self.prog['phase'] = 'quantize'
            self.prog['kl'] = float(self.evo.kl(self.params))
        self._save(ckpt)
        return self.prog['phase'] == 'quantize' and stop.signum is None
      finally:
        ckpt.close()

  def _prune(self, ckpt, layers, checkpoint_every: int, max_generations: int, stop):
    """Generations (or the magnitude baseline's one step) until every layer
    is at its target, ``max_generations`` or a signal (SIGINT/SIGTERM)."""
    here = 0
    while self.prog['phase'] == 'prune' and here < max_generations and stop.signum is None:
      if self.prog['layer'] >= len(layers):
        self.prog['phase'] = 'finetune'
      elif self.method == 'magnitude':
        self._magnitude()
      elif int(self.masks[layers[self.prog['layer']]].sum()) <= self.targets[
          layers[self.prog['layer']]]:
        self._layer_done(ckpt, layers[self.prog['layer']])
      else:
        self._generation(layers[self.prog['layer']])
        here += 1
        if self.prog['generation'] % checkpoint_every == 0:
          self._save(ckpt)

  def _magnitude(self):
    self.masks = {**self.masks, **S.magnitude_masks(self.params, self.targets)}
    self.params = unflatten({p: jnp.where(jnp.asarray(self.masks[p]), v, 0.0)
                             if p in self.masks else v for p, v in flatten(self.params).items()})
    self.prog['layer'] = len(self.targets)

  def _layer_done(self, ckpt, path: str):
    self.finetune(self.settings['finetune_steps'], 'finetuned')
    self.prog['kl'] = float(self.evo.kl(self.params))
    self.say(f'layer {path}: {int(self.masks[path].sum())}/{self.masks[path].size} weights kept, '
             f'KL {self.prog["kl"]:.5f} after fine-tuning')
    self.prog['layer'] += 1
    self.prog['rate'] = 0.25
    self._save(ckpt)

  def _generation(self, path: str):
    p = self.prog
    key = jax.random.fold_in(jax.random.key(self.settings['seed']), p['generation'])
    g0 = time.time()
    self.params, self.masks, p['rate'], p['kl'], info = self.evo.generation(
        self.params, self.masks, path, self.targets[path], p['rate'], key, p['kl'])
    p['generation'] += 1
    p['evaluations'] += info['evaluations']
    if self.settings['generation_finetune']:
      self.finetune(self.settings['generation_finetune'], 'gen_finetuned')
      info['kl'] = p['kl'] = float(self.evo.kl(self.params))
    p['search_seconds'] += time.time() - g0
    if p['generation'] % self.log_every:
      return
    seconds = time.time() - g0
    # ETA of the pruning: weights still to zero in all layers at this
    # generation's pace (a rough one: the pace slows as layers near target).
    left = sum(max(0, int(self.masks[q].sum()) - t) for q, t in self.targets.items())
    eta = left / max(1, info['k']) * seconds
    self.say(f'gen {p["generation"]} {path}: zeroed {info["k"]}, {info["alive"]} left (target '
             f'{info["want"]}), KL {info["kl"]:.5f} (worst candidate {info["kl_worst"]:.5f}), '
             f'{info["evaluations"] / seconds:.0f} candidates/s, pruning eta ~{eta:.0f}s')


def _encode(run: Restored, search: _Search, out: str, budget_kl, budget_acc, min_bits,
            max_bits, leftover_bits, quant_finetune) -> dict:
  """Per-layer bits under the budget, the codebooks' fine-tuning, and the
  model file."""
  model, model_state, images, labels = search.model, search.model_state, search.images, \
      search.labels
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(
      model.apply({'params': p, **model_state}, images, train=False), -1) == labels))
  teacher_acc = float(accuracy(search.teacher))
  flat, layers, masks, prog = flatten(search.params), list(search.targets), search.masks, \
      search.prog

  # The leftovers (biases, norms: every params leaf that is not a pruned
  # kernel) at a fixed number of bits, inside the fitness the budget bounds.
  leftovers = {p: Q.quantize(np.asarray(v), leftover_bits, 'kmeans') for p, v in flat.items()
               if p not in layers and np.size(v)} if leftover_bits else {}
  base = {**flat, **{p: jnp.asarray(q.dense()) for p, q in leftovers.items()}}

  def fitness(layers_dense, f=None):
    f = dict(base if f is None else f)
    f.update({p: jnp.asarray(v) for p, v in layers_dense.items()})
    p = unflatten(f)
    if budget_acc is not None:
      return 100 * (teacher_acc - float(accuracy(p)))
    return float(search.evo.kl(p))
  budget = fitness({}, flat) + (budget_acc if budget_acc is not None else budget_kl)
  say = search.say
  say(f'quantizing: bits per layer ({min_bits}-{max_bits}) within a '
      + (f'{budget_acc:g}-point calibration accuracy' if budget_acc is not None
         else f'{budget_kl:g} KL') + ' budget')
  q0 = time.time()
  kernels = {p: np.asarray(flat[p]) for p in layers}
  alloc = Q.allocate_bits(kernels, fitness, budget, min_bits, max_bits)
  if leftovers and alloc.history[0][1] > budget:  # (its start: every kernel at max_bits)
    leftovers, base = {}, flat  # quantizing the leftovers alone breaks the budget
    alloc = Q.allocate_bits(kernels, fitness, budget, min_bits, max_bits)
  quantized, fit = {**alloc.layers, **leftovers}, alloc.fitness
  say(f'bits chosen in {time.time() - q0:.0f}s: ' + ', '.join(
      f'{p} {q.bits}' for p, q in alloc.layers.items()))
  if quant_finetune and quantized:
    say(f'tuning the codebooks: {quant_finetune} distillation steps')
    tuner = S.CodebookTuner(model, model_state, search.teacher, search.settings['lr'])
    tuned = tuner(search.params, quantized, search.batches(quant_finetune, 'codebooks'))
    tuned_fit = fitness({p: q.dense() for p, q in tuned.items()})
    if tuned_fit <= fit:  # (on the calibration batch; kept only when it helps there)
      quantized, fit = tuned, tuned_fit
  quant_s = time.time() - q0
  arrays = sections.nest(sections.PARAMS, {p: np.asarray(v) for p, v in flat.items()
                                           if p not in quantized})
  arrays.update(sections.nest(sections.PARAMS, quantized))
  arrays.update(sections.nest(sections.MODEL_STATE, {k: np.asarray(v) for k, v in
                                                     flatten(model_state).items()}))
  header = model_header(run.config.model, run.config.model_kwargs.to_dict(), run.num_classes,
                        run.input_shape, {'name': 'dense'}, 0, run.config.dataset, run.step)
  size = artifact.write(out, header, arrays, 'f32', progress=Eta(say, 'encoding', ' weights'))
  final = dict(flat)
  final.update({p: jnp.asarray(q.dense()) for p, q in quantized.items()})
  kept = sum(int(masks[p].sum()) for p in layers)
  total = sum(masks[p].size for p in layers)
  n = run.param.num_params
  return {'finished': True, 'method': search.method, 'file_bytes': size, 'num_params': n,
          'compression': 4 * n / size, 'sparsity': 1 - kept / total,
          'layer_sparsity': {p: 1 - int(masks[p].sum()) / masks[p].size for p in layers},
          'avg_bits': alloc.avg_bits, 'bits': {p: (q.bits, q.method)
                                               for p, q in alloc.layers.items()},
          'leftover_bits': leftover_bits, 'quant_finetune': quant_finetune,
          'kl_pruned': prog['kl'], 'kl_quantized': fit if budget_acc is None else None,
          'generations': prog['generation'], 'evaluations': prog['evaluations'],
          'search_seconds': prog['search_seconds'], 'quantize_seconds': quant_s,
          'distill_steps': prog['finetuned'] + prog['gen_finetuned'],
          'generation_distill_steps': prog['gen_finetuned'], 'params': unflatten(final)}


def test_accuracy(workdir: str, params=None, batch_size: int = 1000) -> float:
  """Test accuracy of ``params`` (default: the run's own) with the model and
  data of ``workdir``, through the trainer's evaluation step."""
  run = restore(workdir)
  c = run.config
  ds = load_dataset(c, 'test')
  params = run.params() if params is None else params
  return evaluate_params(run.model, params, run.train_state.model_state,
                         Pipeline(ds, batch_size, 0, training=False))['accuracy']

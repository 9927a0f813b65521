"""Directed evolution of a trained run: prune, fine-tune, quantize, encode.

Post-training, not an SGD loop: it reuses the trainer's run loading
(``export.run.load_run``), data pipeline, evaluation (``train.step.eval_batch``
via ``evaluate``), verified checkpointing (``train.checkpoint.Checkpointer``)
and workdir lock. Its state lives in ``RUN/evolve/<name>/`` and is checkpointed
every few generations: a killed search resumes where it was.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pemn_jax import __version__
from pemn_jax.data import sources
from pemn_jax.data.pipeline import Pipeline
from pemn_jax.evolve import quantize as Q
from pemn_jax.evolve import search as S
from pemn_jax.export import artifact
from pemn_jax.export.run import load_run
from pemn_jax.params.base import flatten, unflatten
from pemn_jax.train.checkpoint import Checkpointer
from pemn_jax.train.pruning import erk_densities
from pemn_jax.train.workdir import WorkdirLock, prepare

METHODS = ('de', 'magnitude')


def layer_targets(params, order, sparsity: float) -> dict[str, int]:
  """Weights each kernel keeps: ERK allocation of ``sparsity`` over all kernels
  (small layers keep more), counts by the ``n - int(s * n)`` rule."""
  flat = flatten(params)
  paths = [p for p in order if p.endswith('kernel') and p in flat]
  dens = erk_densities([flat[p].shape for p in paths], sparsity)
  out = {}
  for p, d in zip(paths, dens, strict=True):
    n = int(np.prod(flat[p].shape))
    out[p] = max(1, n - int((1.0 - d) * n))
  return out


def _batches(pipe: Pipeline, steps: int, offset: int):
  """Distillation images: batches ``offset`` ... ``offset + steps - 1``."""
  for i in range(steps):
    yield jnp.asarray(pipe.batch(offset + i)[0])


def _done(prog) -> int:
  """Distillation steps taken so far: the next ones read the batches after."""
  return prog['finetuned'] + prog['gen_finetuned']


def evolve(workdir: str, out: str, method: str = 'de', sparsity: float = 0.9,
           population: int = 32, calibration: int = 1024, tau: float = 0.1,
           tolerance: float = 1e-3, finetune_steps: int = 300, budget_kl: float = 0.01,
           budget_acc: float | None = None, min_bits: int = 2, max_bits: int = 8,
           checkpoint_every: int = 10, seed: int = 0, say=print, max_generations: int = 100_000,
           lr: float = 1e-3, generation_finetune: int = 0, extra_finetune: int = 0) -> dict:
  """Sparsifies, quantizes and encodes ``workdir``'s trained model into ``out``.

  Args:
    workdir: a training run (its latest checkpoint is the teacher).
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
  Returns:
    Sparsity, bits, bytes, timings and evaluation counts, and ``params``: the
    quantized params the file holds (those the bit search evaluated).
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  config, meta, model, param, ts = load_run(workdir)
  teacher = jax.jit(param.materialize)(ts.state, ts.seed)
  model_state = ts.model_state
  ds = sources.load(config.dataset, 'train', config.data_dir or None, config.source_dir or None)
  # The teacher's training examples (its train_limit), read into memory once:
  # the calibration batch is the first of a seeded order, distillation
  # batches (128) follow that order.
  n = min(ds.num_examples, config.train_limit or ds.num_examples)
  pipe = Pipeline(ds, min(128, n), seed, limit=n)
  images, labels = pipe.examples(pipe.order(0)[:min(calibration, n)])
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  name = f'{method}-s{sparsity:g}'
  state_dir = prepare(os.path.join(workdir, 'evolve', name))
  targets = layer_targets(teacher, param.order, sparsity)  # kernels in creation order
  evo = S.Evolution(model, model_state, images, teacher, population, tau, tolerance)
  distill = S.Distiller(model, model_state, teacher, lr)

  def batches(steps):
    return _batches(pipe, steps, _done(prog))
  with WorkdirLock(state_dir):
    ckpt = Checkpointer(state_dir, keep=2)
    masks0 = {p: np.ones(flatten(teacher)[p].shape, bool) for p in targets}
    init = {'params': teacher, 'masks': {p: m.astype(np.uint8) for p, m in masks0.items()}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            init)
    # What shapes the search state: a rerun with other values must not
    # silently resume (or overwrite) the saved one.
    settings = {'population': population, 'calibration': calibration, 'tau': tau,
                'tolerance': tolerance, 'finetune_steps': finetune_steps, 'seed': seed,
                'lr': lr, 'generation_finetune': generation_finetune,
                'extra_finetune': extra_finetune}
    step, restored, prog = ckpt.restore_latest(abstract)
    if restored is not None and 'settings' in prog:
      differ = {k: (prog['settings'].get(k), v) for k, v in settings.items()
                if prog['settings'].get(k) != v}
      if differ:
        ckpt.close()
        raise ValueError(
            f'{state_dir} holds a {method} search with other settings ('
            + ', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in differ.items())
            + '); rerun with the saved values to resume it, or move that directory away to '
            'start a new search (it was left untouched)')
    if restored is None:
      params, masks = teacher, masks0
      prog = {'layer': 0, 'generation': 0, 'rate': 0.25, 'kl': 0.0, 'evaluations': 0,
              'search_seconds': 0.0, 'phase': 'prune', 'finetuned': 0, 'gen_finetuned': 0}
    else:
      params = restored['params']
      masks = {p: np.asarray(m) > 0 for p, m in restored['masks'].items()}
      prog = {'gen_finetuned': 0, **prog['progress']}
      say(f'resumed the {method} search at generation {prog["generation"]} ({state_dir})')

    saved = [step]

    def save():
      at = (prog['generation'] + prog['finetuned'] + prog['gen_finetuned']
            + (prog['phase'] != 'prune'))
      if at == saved[0]:
        return
      ckpt.save(at, {'params': params, 'masks': {p: m.astype(np.uint8) for p, m in masks.items()}},
                {'progress': prog, 'settings': settings}, force=True)
      saved[0] = at

    layers = list(targets)
    t0 = time.time()
    generations_here = 0
    while prog['phase'] == 'prune' and generations_here < max_generations:
      if prog['layer'] >= len(layers):
        prog['phase'] = 'finetune'
        break
      path = layers[prog['layer']]
      if method == 'magnitude':
        masks = {**masks, **S.magnitude_masks(params, targets)}
        flat = flatten(params)
        params = unflatten({p: jnp.where(jnp.asarray(masks[p]), v, 0.0) if p in masks else v
                            for p, v in flat.items()})
        prog['layer'] = len(layers)
        continue
      if int(masks[path].sum()) <= targets[path]:
        if finetune_steps:
          params = distill(params, masks, batches(finetune_steps))
          prog['finetuned'] += finetune_steps
        prog['kl'] = float(evo.kl(params))
        say(f'layer {path}: {int(masks[path].sum())}/{masks[path].size} weights kept, KL '
            f'{prog["kl"]:.5f} after fine-tuning')
        prog['layer'] += 1
        prog['rate'] = 0.25
        save()
        continue
      key = jax.random.fold_in(jax.random.key(seed), prog['generation'])
      g0 = time.time()
      params, masks, prog['rate'], prog['kl'], info = evo.generation(
          params, masks, path, targets[path], prog['rate'], key, prog['kl'])
      prog['generation'] += 1
      generations_here += 1
      prog['evaluations'] += info['evaluations']
      if generation_finetune:
        params = distill(params, masks, batches(generation_finetune))
        prog['gen_finetuned'] += generation_finetune
        info['kl'] = prog['kl'] = float(evo.kl(params))
      prog['search_seconds'] += time.time() - g0
      say(f'gen {prog["generation"]} {path}: zeroed {info["k"]}, {info["alive"]} left (target '
          f'{info["want"]}), KL {info["kl"]:.5f} (worst candidate {info["kl_worst"]:.5f}), '
          f'{info["evaluations"] / (time.time() - g0):.0f} candidates/s')
      if prog['generation'] % checkpoint_every == 0:
        save()
    if prog['phase'] == 'prune':  # stopped by max_generations
      save()
      ckpt.close()
      return {'finished': False, 'generation': prog['generation']}
    if prog['phase'] == 'finetune':
      total_ft = finetune_steps * (len(layers) + 1) + extra_finetune - prog['finetuned']
      if total_ft > 0:
        params = distill(params, masks, batches(total_ft))
        prog['finetuned'] += total_ft
      prog['phase'] = 'quantize'
      prog['kl'] = float(evo.kl(params))
      save()
    ckpt.close()

  # Quantization: per-layer bits and method under the budget.
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(
      model.apply({'params': p, **model_state}, images, train=False), -1) == labels))
  teacher_acc = float(accuracy(teacher))
  flat = flatten(params)

  def fitness(layers_dense):
    f = dict(flat)
    f.update({p: jnp.asarray(v) for p, v in layers_dense.items()})
    p = unflatten(f)
    if budget_acc is not None:
      return 100 * (teacher_acc - float(accuracy(p)))
    return float(evo.kl(p))
  pruned_fit = fitness({})
  budget = pruned_fit + (budget_acc if budget_acc is not None else budget_kl)
  weights = {p: np.asarray(flat[p]) for p in layers}
  q0 = time.time()
  alloc = Q.allocate_bits(weights, fitness, budget, min_bits, max_bits)
  quant_s = time.time() - q0
  arrays = {f'params/{p}': np.asarray(v) for p, v in flat.items() if p not in alloc.layers}
  arrays.update({f'params/{p}': q for p, q in alloc.layers.items()})
  arrays.update({f'model_state/{k}': np.asarray(v) for k, v in flatten(model_state).items()})
  header = {'format': 'pemn_jax model', 'pemn_jax_version': __version__,
            'jax_version': jax.__version__, 'model': config.model,
            'model_kwargs': json.loads(json.dumps(config.model_kwargs.to_dict())),
            'num_classes': meta['num_classes'], 'input_shape': list(meta['input_shape']),
            'param': {'name': 'dense'}, 'seed': 0, 'dataset': config.dataset,
            'step': int(meta['step'])}
  size = artifact.write(out, header, arrays, 'f32')
  final = dict(flat)
  final.update({p: jnp.asarray(q.dense()) for p, q in alloc.layers.items()})
  kept = sum(int(masks[p].sum()) for p in layers)
  total = sum(masks[p].size for p in layers)
  return {'finished': True, 'method': method, 'file_bytes': size,
          'num_params': param.num_params, 'compression': 4 * param.num_params / size,
          'sparsity': 1 - kept / total, 'layer_sparsity': {
              p: 1 - int(masks[p].sum()) / masks[p].size for p in layers},
          'avg_bits': alloc.avg_bits, 'bits': {p: (q.bits, q.method)
                                               for p, q in alloc.layers.items()},
          'kl_pruned': prog['kl'], 'kl_quantized': alloc.fitness if budget_acc is None else None,
          'generations': prog['generation'], 'evaluations': prog['evaluations'],
          'search_seconds': prog['search_seconds'], 'quantize_seconds': quant_s,
          'distill_steps': _done(prog), 'generation_distill_steps': prog['gen_finetuned'],
          'seconds': time.time() - t0, 'params': unflatten(final)}


def test_accuracy(workdir: str, params=None, batch_size: int = 1000) -> float:
  """Test accuracy of ``params`` (default: the run's own) with the model and
  data of ``workdir``, through the trainer's evaluation step."""
  from pemn_jax.train.step import eval_batch
  config, _, model, param, ts = load_run(workdir)
  if params is None:
    params = jax.jit(param.materialize)(ts.state, ts.seed)
  ds = sources.load(config.dataset, 'test', config.data_dir or None, config.source_dir or None)
  step = jax.jit(lambda x, y, w: eval_batch(model, lambda rng: params, ts.model_state, x, y, w))
  correct = total = 0.0
  for x, y, w in Pipeline(ds, batch_size, 0, training=False).eval_batches():
    c, t, _ = step(x, y, w)
    correct, total = correct + float(c), total + float(t)
  return correct / total

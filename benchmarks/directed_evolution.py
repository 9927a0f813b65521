"""Directed evolution vs one-shot magnitude pruning, same sparsity, fine-tuning,
bit budget and encoding; and the speed of evaluating a population vmapped.

For each dataset: the dense preset (MLP 784-300-100-10) trains for ``--epochs``
(the teacher); ``python -m pemn_jax.evolve`` then prunes 90% of its kernel
weights (ERK-allocated over layers; DE, or one-shot per-layer magnitude at the
same targets), distills the survivors toward the teacher (the same steps for
both), picks per-layer bits and quantizers under the same KL budget, and
writes the model file. Accuracy is evaluated from the file on the test split;
compression = dense float32 params bytes / file bytes.

Population speed: a population of candidates on every prunable layer,
evaluated as one jitted vmapped call vs one jitted call per candidate (same
candidates, median of ``--reps`` after warm-up); the summary line is one
generation on each layer.

    .venv/bin/python benchmarks/directed_evolution.py     # MNIST + Fashion-MNIST, ~8 min
    .venv/bin/python benchmarks/directed_evolution.py --smoke
    .venv/bin/python benchmarks/directed_evolution.py --datasets mnist --generation_finetune 30

``--generation_finetune N``: DE also distills N steps after every generation;
the baseline then gets the same total distillation (its extra steps at the
end), and the table goes to ``directed_evolution_gft<N>.md``.

Last lines (one per method, and the speed, per dataset):
    <dataset> method=<de|magnitude> sparsity=<s> avg_bits=<b> file_bytes=<n>
      compression=<x> acc_drop=<d>     (on one line)
    <dataset> population_evals_per_s vmapped=<a> loop=<b> speedup=<a/b>
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]  # the repo root (configs/)


def population_speed(workdir, population, reps, calibration):
  """Candidate evaluations per second on every prunable layer: one jitted
  vmapped call vs one jitted call per candidate (the same candidates).
  Returns ``{layer: (vmapped, loop)}``."""
  import jax
  import jax.numpy as jnp

  from pemn_jax.data import sources
  from pemn_jax.data.pipeline import Pipeline
  from pemn_jax.evolve.search import Evolution
  from pemn_jax.pytrees import flatten
  from pemn_jax.train.run import restore
  run = restore(workdir)
  config, model, param, ts = run.config, run.model, run.param, run.train_state
  teacher = run.params()
  ds = sources.load(config.dataset, 'train', config.data_dir)
  images = jnp.asarray(Pipeline(ds, calibration, 0).batch(0)[0])
  evo = Evolution(model, ts.model_state, images, teacher, population)
  out = {}
  for path in [p for p in param.order if p.endswith('kernel')]:
    w = flatten(teacher)[path]
    one = evo.candidate_kl(path, w.shape)
    keep = [jax.random.uniform(jax.random.key(i), (w.size,)) > 0.1 for i in range(population)]
    kernels = jnp.stack([jnp.where(k, w.reshape(-1), 0.0) for k in keep])
    vmapped = jax.jit(jax.vmap(lambda kk, one=one: one(teacher, kk)))
    jax.block_until_ready(vmapped(kernels))
    jax.block_until_ready(one(teacher, kernels[0]))
    vm, lp = [], []
    for _ in range(reps):  # interleaved
      t0 = time.perf_counter()
      jax.block_until_ready(vmapped(kernels))
      vm.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      for k in kernels:
        jax.block_until_ready(one(teacher, k))
      lp.append(time.perf_counter() - t0)
    out[path] = (statistics.median(vm), statistics.median(lp))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--datasets', nargs='+', default=['mnist', 'fashion_mnist'])
  ap.add_argument('--sparsity', type=float, default=0.9)
  ap.add_argument('--epochs', type=float, default=3.0)
  ap.add_argument('--population', type=int, default=32)
  ap.add_argument('--budget_kl', type=float, default=0.01)
  ap.add_argument('--generation_finetune', type=int, default=0,
                  help='DE: distillation steps after every generation too (the baseline gets '
                  'the same total)')
  ap.add_argument('--reps', type=int, default=7)
  ap.add_argument('--out', default='benchmarks/results')
  ap.add_argument('--smoke', action='store_true', help='tiny teacher, tiny search at 50%% sparsity')
  args = ap.parse_args()
  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.evolve.compress import evolve, test_accuracy
  from pemn_jax.train.loop import train_and_evaluate
  if args.smoke:
    args.datasets, args.reps, args.sparsity = args.datasets[:1], 1, 0.5
  lines, table = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for dataset in args.datasets:
      c = importlib.import_module('configs.dense').get_config(
          f'model=mlp,dataset={dataset},epochs={args.epochs}')
      c.log_every, c.checkpoint_every = 100_000, 1_000_000
      kw = {}
      if args.smoke:
        c.num_steps, c.train_limit = 20, 512
        kw = dict(population=4, calibration=128, finetune_steps=5, checkpoint_every=100_000)
      wd = os.path.join(tmp, dataset)
      train_and_evaluate(c, wd)
      teacher = test_accuracy(wd)
      extra = 0  # the baseline's extra distillation: DE's between generations
      for method in ('de', 'magnitude'):
        path = os.path.join(tmp, f'{dataset}_{method}.pemn')
        kw.setdefault('population', args.population)
        t0 = time.time()
        more = (dict(generation_finetune=args.generation_finetune) if method == 'de'
                else dict(extra_finetune=extra))
        out = evolve(wd, path, method, args.sparsity, budget_kl=args.budget_kl,
                     say=lambda *_: None, **kw, **more)
        if method == 'de':
          extra = out['generation_distill_steps']
        acc = evaluate_artifact(path)['accuracy']
        drop = 100 * (teacher - acc)
        table.append(f'| {dataset} | {method} | {out["sparsity"]:.4f} | {out["avg_bits"]:.2f} | '
                     f'{out["file_bytes"]} | {out["compression"]:.1f}x | {100 * teacher:.2f}% | '
                     f'{100 * acc:.2f}% | {drop:.2f} | {out["generations"]} | '
                     f'{out["distill_steps"]} | {time.time() - t0:.0f} s |')
        print(f'# {table[-1]}', flush=True)
        lines.append(f'{dataset} method={method} sparsity={out["sparsity"]:.4f} '
                     f'avg_bits={out["avg_bits"]:.3f} file_bytes={out["file_bytes"]} '
                     f'compression={out["compression"]:.2f} acc_drop={drop:.3f}')
      speed = population_speed(wd, kw['population'], args.reps, kw.get('calibration', 1024))
      for layer, (tv, tl) in speed.items():
        table.append(f'| {dataset} | population of {kw["population"]} on {layer} | vmapped '
                     f'{tv * 1000:.1f} ms | one by one {tl * 1000:.1f} ms | speedup '
                     f'{tl / tv:.2f} |')
        print(f'# {table[-1]}', flush=True)
      n = kw['population'] * len(speed)  # one generation on every layer
      vm = n / sum(tv for tv, _ in speed.values())
      lp = n / sum(tl for _, tl in speed.values())
      lines.append(f'{dataset} population_evals_per_s vmapped={vm:.1f} loop={lp:.1f} '
                   f'speedup={vm / lp:.2f}')
  gft = (f'; DE distills {args.generation_finetune} steps after every generation'
         if args.generation_finetune else '')
  head = [f'MLP 784-300-100-10, dense preset teacher; {args.sparsity:.0%} of kernel weights '
          f'removed (ERK over layers), the same total distillation and KL budget for both{gft}; '
          'accuracy of the file (test).', '',
          '| dataset | method | sparsity | avg bits | file bytes | compression | teacher | '
          'file | drop (points) | generations | distill steps | time |', '| --- ' * 12 + '|']
  if not args.smoke:
    os.makedirs(args.out, exist_ok=True)
    name = (f'directed_evolution_gft{args.generation_finetune}.md' if args.generation_finetune
            else 'directed_evolution.md')
    with open(os.path.join(args.out, name), 'w') as f:
      f.write('\n'.join(head + table + [''] + lines) + '\n')
  print('\n'.join(head + table))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

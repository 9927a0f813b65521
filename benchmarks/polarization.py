"""Polarization gating: one training pass to a target sparsity, then sliced.

For each model/dataset: the dense preset trained once, then one gated pass per
target (configs/polarization.py, same epochs and batch), exported physically
sliced (``export --slice``) and evaluated *from the file*. Reported: the
sparsity reached (fraction of kernel weights removed, from the final 0/1
gates), test accuracy of the dense and of the sliced network (final state),
parameters and FLOPs (XLA's cost analysis of the compiled forward, batch 128)
of the sliced model over the dense one, and wall-clock of the gated pass over
dense training.

    .venv/bin/python benchmarks/polarization.py    # MLP, LeNet-5 (MNIST/F-MNIST), CIFAR ResNet-20
    .venv/bin/python benchmarks/polarization.py --runs mnist:mlp --epochs 3
    .venv/bin/python benchmarks/polarization.py --smoke

Writes OUT/polarization.md. Last lines, one per run:
    <model> target=<t> achieved=<s> dense_acc=<a> pruned_acc=<b> params_ratio=<r> flops_ratio=<f>
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]  # the repo root (configs/)


def forward_flops(model, params, model_state, input_shape, batch=128) -> float:
  import jax
  import jax.numpy as jnp
  x = jnp.zeros((batch, *input_shape), jnp.float32)
  f = jax.jit(lambda p, s, x: model.apply({'params': p, **s}, x, train=False))
  cost = f.lower(params, model_state, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost['flops'])


def make_config(module, arg, args, epochs):
  c = importlib.import_module(f'configs.{module}').get_config(arg)
  c.num_epochs = epochs
  c.log_every = 100_000
  c.checkpoint_every = 1_000_000
  c.data_dir = args.data_dir
  if args.smoke:
    c.num_steps, c.train_limit, c.test_limit = 6, 512, 500
  return c


def run_one(dataset, model_name, args, tmp):
  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.export.model_file import export_run, load
  from pemn_jax.train.loop import train_and_evaluate
  from pemn_jax.train.run import restore
  epochs = args.epochs if dataset != 'cifar10' else args.cifar_epochs
  base = f'model={model_name},dataset={dataset}'
  dense_wd = os.path.join(tmp, f'{dataset}_{model_name}_dense')
  t0 = time.time()
  dense = train_and_evaluate(make_config('dense', base, args, epochs), dense_wd)
  dense_s = time.time() - t0
  dense_run = restore(dense_wd)
  dmodel, dparam, dts = dense_run.model, dense_run.param, dense_run.train_state
  shape = dense_run.input_shape
  dparams = dparam.materialize(dts.state, dts.seed)
  dense_flops = forward_flops(dmodel, dparams, dts.model_state, shape)
  rows = []
  for target in (args.cifar_targets if dataset == 'cifar10' else args.targets):
    wd = os.path.join(tmp, f'{dataset}_{model_name}_{target}')
    t0 = time.time()
    out = train_and_evaluate(make_config('polarization', f'{base},sparsity={target}', args,
                                         epochs), wd)
    pol_s = time.time() - t0
    if out['stopped']:
      raise SystemExit('stopped by a signal')
    path = os.path.join(tmp, f'{dataset}_{model_name}_{target}.pemn')
    export_run(wd, path, params_dir=None, slice_gates=True)
    ev = evaluate_artifact(path, dataset, args.data_dir or None)
    _, smodel, sparams, sstate = load(path)
    import jax

    from pemn_jax.pytrees import flatten
    n_sliced = sum(x.size for x in jax.tree.leaves(sparams))
    kernels = lambda tree: sum(v.size for k, v in flatten(tree).items()  # noqa: E731
                               if k.endswith('kernel'))
    achieved = 1 - kernels(sparams) / kernels(dparams)  # from the sliced file itself
    rows.append({
        'model': f'{dataset}/{model_name}', 'target': target, 'achieved': achieved,
        'dense_acc': dense['test_accuracy'], 'pruned_acc': ev['accuracy'],
        'gated_run_acc': out['test_accuracy'],
        'params_ratio': n_sliced / dparam.num_params,
        'flops_ratio': forward_flops(smodel, sparams, sstate, shape) / dense_flops,
        'time_ratio': pol_s / dense_s, 'dense_s': dense_s, 'pol_s': pol_s,
        'kwargs': {k: v for k, v in load(path)[0]['model_kwargs'].items() if k != 'gates'},
        'file_bytes': os.path.getsize(path)})
    r = rows[-1]
    print(f'# {r["model"]} target {target}: achieved {achieved:.3f}, dense {r["dense_acc"]:.4f}, '
          f'sliced {r["pruned_acc"]:.4f}, params {r["params_ratio"]:.3f}, flops '
          f'{r["flops_ratio"]:.3f}, time {r["time_ratio"]:.2f}x, {r["kwargs"]}', flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--runs', nargs='+',
                  default=['mnist:mlp', 'fashion_mnist:mlp', 'mnist:lenet5',
                           'fashion_mnist:lenet5', 'cifar10:resnet20'])
  ap.add_argument('--targets', type=float, nargs='+', default=[0.3, 0.5, 0.7])
  ap.add_argument('--epochs', type=float, default=3.0)
  ap.add_argument('--cifar_epochs', type=float, default=2.0)
  ap.add_argument('--cifar_targets', type=float, nargs='+', default=[0.5],
                  help='CIFAR-10 runs take ~10 min each on 2 CPU cores')
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--out', default='benchmarks/results')
  ap.add_argument('--smoke', action='store_true', help='one MLP run, 6 steps (checks the script)')
  args = ap.parse_args()
  if args.smoke:
    args.runs, args.targets = ['mnist:mlp'], [0.5]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for spec in args.runs:
      dataset, model_name = spec.split(':')
      rows += run_one(dataset, model_name, args, tmp)
  table = [f'One gated pass (configs/polarization.py) vs the dense preset, same epochs '
           f'({args.epochs}; CIFAR-10 {args.cifar_epochs}), batch 128; accuracies of the final '
           'state, the sliced network evaluated from its file; ratios sliced / dense.', '',
           '| model | target | achieved | dense acc | sliced acc | params | FLOPs | time | '
           'sliced shape |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  table += [f'| {r["model"]} | {r["target"]:.0%} | {r["achieved"]:.1%} | '
            f'{100 * r["dense_acc"]:.2f}% | {100 * r["pruned_acc"]:.2f}% | '
            f'{r["params_ratio"]:.3f} | {r["flops_ratio"]:.3f} | {r["time_ratio"]:.2f}x | '
            f'{r["kwargs"]} |' for r in rows]
  if not args.smoke:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'polarization.md'), 'w') as f:
      f.write('\n'.join(table) + '\n')
  print('\n'.join(table))
  for r in rows:
    print(f'{r["model"]} target={r["target"]} achieved={r["achieved"]:.4f} '
          f'dense_acc={r["dense_acc"]:.4f} pruned_acc={r["pruned_acc"]:.4f} '
          f'params_ratio={r["params_ratio"]:.4f} flops_ratio={r["flops_ratio"]:.4f}')


if __name__ == '__main__':
  main()

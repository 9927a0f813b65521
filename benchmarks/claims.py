"""The papers' headline claims re-measured with pemn_jax sweeps (docs/results.md).

    .venv/bin/python benchmarks/claims.py --claims rpg
    .venv/bin/python benchmarks/claims.py --claims NAME [NAME ...] --dataset mnist --epochs 3

Each claim is one or more ``pemn_jax.ablate`` sweeps (variants differing in
seed, keep, lr or sparsity train as one vmapped step) with the presets of
configs/*.py, at a scale that fits a 2-core CPU; the commands each claim runs
are printed. Final and best test accuracy (best over evaluations, every
epoch) are mean ± sample std over the seeds.

* ``pemn`` (PEMN Fig. 3): Dense, Mask (edge-popup on i.i.d. random weights),
  OL, MP, RP 1e-1 ... 1e-5 on a small ViT (dim 64, depth 4, 4 heads, patch 7).
* ``pruning`` (PEMN Figs. 4-5): PEMN RP vs gradual magnitude pruning
  (global, first layer dense, ramp over 10-60% of the run: the strongest
  baseline of benchmarks/storage_vs_pruning.py) at 90-96.9% sparsity,
  LeNet-5; file sizes from the exported model files. "Best" of a pruned run
  includes evaluations before it reached its sparsity: compare finals. With
  ``--float_bits B`` every run is also exported with its floats on a B-bit
  grid (``export --float_bits``) and that file evaluated: the comparison at
  equal float storage (PEMN's prototype and biases, GMP's surviving weights).
* ``rpg`` (RPG): accuracy vs DoF over 5 DoF values (log scale) with the
  least-squares law ``acc = a + b log10(D)`` (slope b, R^2), on the MLP
  784-300-100-10 with every kernel generated (`generate=@kernels`: the
  reference keeps the stem and classifier ordinary, which on an MLP is 88%
  of N); and dense MLPs with about as many trained parameters.
* ``polarization``: targets 30/50/70% (one vmapped group) vs the dense
  model, LeNet-5.
* ``de`` (Directed Evolution): three dense MLP teachers; DE and magnitude
  pruning at 90% and 95% sparsity with the bit search: file bytes,
  compression, accuracy drop.

With ``--dataset cifar10`` each claim runs at the largest scale that fits
this CPU (see docs/results.md for the epochs and seeds used): ``pemn`` on a
small ConvMixer (dim 128, depth 4, kernel 5, patch 4; its Dense trained on
the same augmentation as the masks, the reference's RandAugment pipeline),
``pruning``, ``rpg`` and ``polarization`` on ResNet-20 (RPG with the
reference's ordinary stem and classifier), ``de`` on the MLP (3072-300-100-10).
``--smoke`` runs the first and last value of each sweep.

Writes OUT/claims_<claim>_<dataset>.md. Last lines: one
``<claim> <what>=<value> ...`` line per point.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from pemn_jax.kernels import cpu_tuning  # noqa: E402

cpu_tuning.configure()


def mean_std(xs):
  m = sum(xs) / len(xs)
  s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return m, s


def fmt(xs, scale=100.0):
  m, s = mean_std([scale * x for x in xs])
  return f'{m:.2f} ± {s:.2f}' if len(xs) > 1 else f'{m:.2f}'


class Runner:
  """Runs sweeps under one root, printing their commands."""

  def __init__(self, root, dataset, epochs, seeds, smoke):
    self.root, self.dataset, self.epochs, self.smoke = root, dataset, epochs, smoke
    self.seeds = 'seed=' + ','.join(str(i) for i in range(seeds))
    self.log = []

  @property
  def cifar(self):
    return 'cifar' in self.dataset

  @property
  def resnet(self):
    """The CIFAR ResNet: ResNet-20 (--smoke: ResNet-8, a third of the
    compilation; the smoke checks the script, not the figures)."""
    return 'resnet8' if self.smoke else 'resnet20'

  @property
  def net(self):
    """The conv net of the pruning and polarization claims."""
    return self.resnet if self.cifar else 'lenet5'

  def pick(self, values):
    """A sweep's values; under --smoke its first and last only."""
    return [values[0], values[-1]] if self.smoke and len(values) > 2 else list(values)

  def sets(self, spe=None):
    if self.smoke:
      return ['num_steps=3', 'train_limit=256', 'test_limit=100', 'batch_size=32',
              'eval_batch_size=50', 'log_every=1', 'eval_every=0', 'checkpoint_every=1000']
    # Evaluate every epoch (best-over-training), checkpoint at the end.
    return [f'eval_every={spe}', 'checkpoint_every=100000', 'log_every=100']

  def sweep(self, name, config, sweeps, extra_sets=()):
    from pemn_jax.sweep import run_sweep
    spe = 60000 // 128 if self.dataset in ('mnist', 'fashion_mnist') else 50000 // 128
    sets = self.sets(spe) + list(extra_sets)
    cmd = ' '.join(['python', '-m', 'pemn_jax.ablate', '--config', config,
                    *[f'--sweep {s}' for s in sweeps], *[f'--set {s}' for s in sets],
                    f'--workdir WORKDIR/{name}'])
    t0 = time.time()
    # Conv models: one variant per step (three vmapped ResNet-20 variants had
    # 2.5x less total throughput than one alone on XLA:CPU; docs/ablations.md).
    # (A --smoke's 3 steps gain nothing from that and pay a compilation per
    # variant: it groups them.)
    max_group = 1 if self.cifar and not self.smoke else 0
    if max_group:
      cmd += f' --max_group {max_group}'
    print(f'# {cmd}', flush=True)
    self.log.append(cmd)
    out = run_sweep(config, sweeps, os.path.join(self.root, name),
                    say=lambda m: print(f'#   {m}', flush=True) if 'step' not in m else None,
                    plots=not self.smoke, overrides=sets, max_group=max_group)
    print(f'#   {len(out)} variants in {time.time() - t0:.0f} s', flush=True)
    return out


def size_plot(path, series, ylabel):
  """``series``: {label: [(file bytes, mean, std), ...]} as lines over file
  bytes (log scale), mean ± std error bars; a PNG at ``path``."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, pts in series.items():
    pts = sorted(pts)
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker='o',
                capsize=3, label=label)
  ax.set_xscale('log')
  ax.set_xlabel('model file bytes')
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  print(f'# wrote {path}', flush=True)


def by(results, key):
  out = {}
  for r in results:
    v = r['values'].get(key)
    out.setdefault('x'.join(map(str, v)) if isinstance(v, list) else v, []).append(r)
  return out


def claim_pemn(run: Runner, a):
  ep = a.epochs
  dense_sets = []
  if run.cifar:  # a small ConvMixer (the paper's family); Dense on the same data pipeline
    model, vit = 'convmixer', ['model_kwargs.dim=128',
                               f'model_kwargs.depth={1 if run.smoke else 4}',
                               'model_kwargs.kernel_size=5', 'model_kwargs.patch_size=4']
    dense_sets = ['augment=pemn', 'model_kwargs.use_bias=false']
  else:
    model, vit = 'vit', ['model_kwargs.dim=64', 'model_kwargs.depth=4',
                         'model_kwargs.num_heads=4', 'model_kwargs.mlp_dim=128',
                         'model_kwargs.patch_size=7']
  base = f'configs/pemn.py:model={model},dataset={run.dataset},epochs={ep}'
  rows = []
  dense = run.sweep('pemn_dense', f'configs/dense.py:model={model},dataset={run.dataset},'
                    f'epochs={ep}', [run.seeds], vit + dense_sets)
  rows.append(('Dense', dense))
  labels = run.pick([('dense', 'Mask (random weights)'), ('ol', 'OL'), ('mp', 'MP')])
  modes = run.sweep('pemn_modes', base, [f'arg.mode={",".join(m for m, _ in labels)}',
                                         run.seeds], vit)
  for mode, label in labels:
    rows.append((label, by(modes, 'arg.mode')[mode]))
  ratios = run.pick(['1e-1', '1e-2', '1e-3', '1e-4', '1e-5'])
  rp = run.sweep('pemn_rp', base + ',mode=rp', [f'arg.ratio={",".join(ratios)}', run.seeds], vit)
  for r in ratios:
    rows.append((f'RP {r}', by(rp, 'arg.ratio')[r]))
  lines = ['| strategy | stored bytes (estimate) | final test acc | best test acc |',
           '| --- | --- | --- | --- |']
  out = []
  for label, rs in rows:
    lines.append(f'| {label} | {rs[0]["model_bytes"]} | {fmt([r["test_accuracy"] for r in rs])} '
                 f'| {fmt([r["best_test_accuracy"] for r in rs])} |')
    out.append(f'pemn strategy={label.replace(" ", "_")} model_bytes={rs[0]["model_bytes"]} '
               f'final={mean_std([r["test_accuracy"] for r in rs])[0]:.4f} '
               f'best={mean_std([r["best_test_accuracy"] for r in rs])[0]:.4f}')
  return lines, out


def claim_pruning(run: Runner, a):
  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.export.model_file import export_run
  ep = a.epochs
  net = run.net
  # CIFAR: the two ends of the range only (one ResNet-20 epoch is ~3 min here).
  ratios, sparsities = (('1e-1,1e-2', '0.9,0.969') if run.cifar else
                        ('1e-1,1e-2,1e-3', '0.9,0.94,0.969'))
  rows = []
  dense = run.sweep('pruning_dense', f'configs/dense.py:model={net},dataset={run.dataset},'
                    f'epochs={ep}', [run.seeds])
  rows.append(('dense', dense))
  rp = run.sweep('pruning_pemn', f'configs/pemn.py:model={net},dataset={run.dataset},'
                 f'epochs={ep},mode=rp', [f'arg.ratio={ratios}', run.seeds])
  for r, rs in by(rp, 'arg.ratio').items():
    rows.append((f'PEMN RP {r}', rs))
  # GMP as benchmarks/storage_vs_pruning.py tunes it: ramp from 10% to 60% of the run.
  gmp = run.sweep('pruning_gmp', f'configs/dense.py:model={net},dataset={run.dataset},'
                  f'epochs={ep},prune=gmp,allocation=global,skip_first=true',
                  [f'arg.sparsity={sparsities}', run.seeds],
                  ['prune.begin_fraction=0.1', 'prune.end_fraction=0.6'])
  for s, rs in by(gmp, 'arg.sparsity').items():
    rows.append((f'GMP global {float(s):.1%}', rs))
  lines = ['| method | file bytes | compression | final test acc | best test acc |',
           '| --- | --- | --- | --- | --- |']
  out, series, grid = [], {}, []

  def add(table, label, name, key, sizes, finals, bests, dense_bytes):
    """One row (mean file bytes, compression, final/best accuracy) into
    ``table``, its last line (``method=name``) into ``out``, its point into
    ``series[key]``."""
    size = sum(sizes) / len(sizes)
    comp = dense_bytes / size
    table.append(f'| {label} | {size:,.0f} | {comp:.1f}x | {fmt(finals)} | '
                 f'{fmt(bests) if bests else "—"} |')
    final = mean_std([100 * x for x in finals])
    out.append(f'pruning method={name} file_bytes={size:.0f} compression={comp:.2f} '
               f'final={final[0] / 100:.4f}')
    series.setdefault(key, []).append((size, *final))

  for label, rs in rows:
    sizes, gsizes, gacc = [], [], []
    for r in rs:
      d = os.path.join(run.root, {'dense': 'pruning_dense'}.get(label, 'pruning_pemn' if 'PEMN'
                                                              in label else 'pruning_gmp'),
                       r['variant'])
      sizes.append(export_run(d, d + '.pemn')['file_bytes'])
      if a.float_bits:  # the same run, its floats on a grid: evaluated from that file
        path = f'{d}.grid{a.float_bits}.pemn'
        gsizes.append(export_run(d, path, params_dir=None,
                                 float_bits=a.float_bits)['file_bytes'])
        gacc.append(evaluate_artifact(path)['accuracy'])
    dense_bytes, kind, name = rs[0]['dense_bytes'], label.split(' ')[0], label.replace(' ', '_')
    add(lines, label, name, kind, sizes, [r['test_accuracy'] for r in rs],
        [r['best_test_accuracy'] for r in rs], dense_bytes)
    if gsizes:
      add(grid, f'{label}, {a.float_bits}-bit grid', f'{name}_grid{a.float_bits}',
          f'{kind} ({a.float_bits}-bit grid)', gsizes, gacc, None, dense_bytes)
  lines += grid
  size_plot(os.path.join(run.root, 'claim_pruning.png'), series, 'final test accuracy (%)')
  return lines, out


def fit_log_linear(xs, ys):
  """Least squares ``y = a + b log10(x)``: (a, b, R^2)."""
  lx = [math.log10(x) for x in xs]
  mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
  sxx = sum((x - mx) ** 2 for x in lx)
  b = sum((x - mx) * (y - my) for x, y in zip(lx, ys)) / sxx
  a = my - b * mx
  ss_res = sum((y - a - b * x) ** 2 for x, y in zip(lx, ys))
  ss_tot = sum((y - my) ** 2 for y in ys)
  return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def claim_rpg(run: Runner, a):
  ep = a.epochs
  dofs = run.pick(['0.001', '0.003', '0.01', '0.03', '0.1'])
  if run.cifar:  # ResNet-20 as the reference: stem and classifier ordinary
    net, gen, small, key = run.resnet, '', ['4', '8', '16'], 'model_kwargs.width'
  else:
    net, gen, small, key = ('mlp', ',generate=@kernels', ['4x', '32x', '300x100'],
                            'model_kwargs.hidden')
  small = f'{key}={",".join(run.pick(small))}'
  rpg = run.sweep('rpg', f'configs/rpg.py:model={net},dataset={run.dataset},epochs={ep}{gen}',
                  [f'arg.dof={",".join(dofs)}', run.seeds])
  dense = run.sweep('rpg_dense_small', f'configs/dense.py:model={net},dataset={run.dataset},'
                    f'epochs={ep}', [small, run.seeds])
  lines = ['| model | trained params | final test acc | best test acc |',
           '| --- | --- | --- | --- |']
  out, xs, ys = [], [], []
  for d in dofs:
    rs = by(rpg, 'arg.dof')[d]
    n = rs[0]['trainable']
    lines.append(f'| RPG dof={d} (of N={rs[0]["num_params"]}) | {n:,} | '
                 f'{fmt([r["test_accuracy"] for r in rs])} | '
                 f'{fmt([r["best_test_accuracy"] for r in rs])} |')
    for r in rs:
      xs.append(n)
      ys.append(100 * r['test_accuracy'])
    final = mean_std([r['test_accuracy'] for r in rs])[0]
    out.append(f'rpg dof={d} trainable={n} final={final:.4f}')
  for h, rs in by(dense, key).items():
    lines.append(f'| dense {net} {key.split(".")[1]}={h} | {rs[0]["trainable"]:,} | '
                 f'{fmt([r["test_accuracy"] for r in rs])} | '
                 f'{fmt([r["best_test_accuracy"] for r in rs])} |')
    out.append(f'rpg dense_{key.split(".")[1]}={h} trainable={rs[0]["trainable"]} '
               f'final={mean_std([r["test_accuracy"] for r in rs])[0]:.4f}')
  a0, b, r2 = fit_log_linear(xs, ys)
  lines += ['', f'Fit over all seeds (final accuracy, points): acc = {a0:.2f} + {b:.2f} log10(D) '
                f'(R² = {r2:.3f}; D = trained parameters).']
  out.append(f'rpg law slope_points_per_decade={b:.3f} r2={r2:.3f}')
  return lines, out


def claim_polarization(run: Runner, a):
  ep = a.epochs
  net = run.net
  dense = run.sweep('polarization_dense', f'configs/dense.py:model={net},dataset={run.dataset},'
                    f'epochs={ep}', [run.seeds])
  pol = run.sweep('polarization', f'configs/polarization.py:model={net},dataset={run.dataset},'
                  f'epochs={ep}',
                  [f'param.sparsity={",".join(run.pick(["0.3", "0.5", "0.7"]))}', run.seeds])
  base = mean_std([r['test_accuracy'] for r in dense])[0]
  lines = ['| target | reached sparsity | final test acc | drop vs dense (points) '
           '| best test acc |',
           '| --- | --- | --- | --- | --- |',
           f'| dense | 0 | {fmt([r["test_accuracy"] for r in dense])} | — | '
           f'{fmt([r["best_test_accuracy"] for r in dense])} |']
  out = []
  for s, rs in by(pol, 'param.sparsity').items():
    reached = [last_metric(os.path.join(run.root, 'polarization', r['variant']), 'gate_sparsity')
               for r in rs]
    drop = [100 * (base - r['test_accuracy']) for r in rs]
    lines.append(f'| {s} | {fmt(reached)} % | {fmt([r["test_accuracy"] for r in rs])} | '
                 f'{fmt(drop, 1.0)} | '
                 f'{fmt([r["best_test_accuracy"] for r in rs])} |')
    out.append(f'polarization target={s} reached={mean_std(reached)[0]:.4f} '
               f'drop_points={mean_std(drop)[0]:.3f}')
  return lines, out


def last_metric(run_dir, name):
  import json
  value = None
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    for r in map(json.loads, f):
      value = r.get(name, value)
  return value


def claim_de(run: Runner, a):
  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.evolve.compress import evolve
  ep = a.epochs
  teachers = run.sweep('de_teachers', f'configs/dense.py:model=mlp,dataset={run.dataset},'
                       f'epochs={ep}', [run.seeds])
  # --smoke: a tiny search at 50% (a 3-step teacher fails the KL tolerance
  # often, so a search to 90% takes hundreds of small generations).
  kw = dict(population=4, calibration=128, finetune_steps=5, quant_finetune=5,
            checkpoint_every=100_000) if run.smoke else {}
  lines = ['| method | sparsity | avg bits | file bytes | compression | acc drop (points) |',
           '| --- | --- | --- | --- | --- | --- |']
  out, series = [], {}
  for sparsity in (0.5,) if run.smoke else (0.9, 0.95):
    for method in ('de', 'magnitude'):
      got = []
      for t in teachers:
        wd = os.path.join(run.root, 'de_teachers', t['variant'])
        path = os.path.join(run.root, f'de_{t["variant"]}_{method}_{sparsity}.pemn')
        cmd = ['python', '-m', 'pemn_jax.evolve', '--workdir', wd, '--out', path, '--method',
               method, '--sparsity', str(sparsity)]
        print('# ' + ' '.join(cmd), flush=True)
        o = evolve(wd, path, method, sparsity, say=lambda *_: None, **kw)
        acc = evaluate_artifact(path)['accuracy']
        got.append((o['avg_bits'], o['file_bytes'], o['compression'],
                    100 * (t['test_accuracy'] - acc)))
      bits, size, comp, drop = (mean_std([g[i] for g in got]) for i in range(4))
      lines.append(f'| {method} | {sparsity} | {bits[0]:.2f} | {size[0]:,.0f} | {comp[0]:.1f}x | '
                   f'{fmt([g[3] for g in got], 1.0)} |')
      out.append(f'de method={method} sparsity={sparsity} avg_bits={bits[0]:.3f} '
                 f'file_bytes={size[0]:.0f} compression={comp[0]:.2f} acc_drop={drop[0]:.3f}')
      series.setdefault(method, []).append((size[0], *drop))
  size_plot(os.path.join(run.root, 'claim_de.png'), series,
            'accuracy drop vs teacher (points)')
  return lines, out


CLAIMS = {'pemn': claim_pemn, 'pruning': claim_pruning, 'rpg': claim_rpg,
          'polarization': claim_polarization, 'de': claim_de}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--claims', nargs='+', default=list(CLAIMS), choices=list(CLAIMS))
  ap.add_argument('--dataset', default='fashion_mnist')
  ap.add_argument('--epochs', type=float, default=3.0)
  ap.add_argument('--seeds', type=int, default=3)
  ap.add_argument('--workdir', default='workdirs/claims',
                  help='sweeps live here (a rerun resumes them)')
  ap.add_argument('--out', default='benchmarks/results')
  ap.add_argument('--smoke', action='store_true', help='2 seeds, 3 steps, data slices')
  ap.add_argument('--float_bits', type=int, default=None,
                  help='pruning: also export every run with its floats on a grid of these bits')
  args = ap.parse_args(argv)
  import tempfile

  import jax
  tmp = tempfile.mkdtemp() if args.smoke else None
  root = os.path.join(tmp, 'claims') if args.smoke else args.workdir
  out_dir = tmp if args.smoke else args.out
  run = Runner(root, args.dataset, args.epochs, 2 if args.smoke else args.seeds, args.smoke)
  tail = []
  for name in args.claims:
    t0 = time.time()
    run.log = []
    lines, out = CLAIMS[name](run, args)
    header = [f'# Claim `{name}`: {args.dataset}, {args.epochs:g} epochs, '
              f'{2 if args.smoke else args.seeds} seeds (mean ± sample std), jax '
              f'{jax.__version__}, {jax.device_count()} CPU device(s), '
              f'{time.strftime("%Y-%m-%d")}, {time.time() - t0:.0f} s', '',
              'Commands (WORKDIR = --workdir):', '']
    text = header + [f'    {c}' for c in run.log] + [''] + lines + ['']
    path = os.path.join(out_dir, f'claims_{name}_{args.dataset}.md')
    os.makedirs(out_dir, exist_ok=True)
    with open(path, 'w') as f:
      f.write('\n'.join(text))
    print('\n'.join(lines), flush=True)
    tail += out
  print('\n'.join(tail))


if __name__ == '__main__':
  main()

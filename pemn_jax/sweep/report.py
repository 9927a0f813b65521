"""A sweep's results table (CSV, Markdown) and plots (PNG) in its workdir."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

COLUMNS = ('test_accuracy', 'best_test_accuracy', 'best_step', 'test_loss', 'step', 'trainable',
           'model_bytes', 'dense_bytes', 'group_size', 'group_wall_s')


def _fmt(x) -> str:
  if isinstance(x, float):
    return f'{x:.4f}' if abs(x) >= 1e-3 or x == 0 else f'{x:.3g}'
  return str(x)


def summarize(results: list[dict], keys: list[str]) -> list[dict]:
  """Mean and std of the final and best test accuracy over the variants that
  differ only in ``seed`` (one row per value of the other swept keys).

  Args:
    results: the variants' results (``result.json``).
    keys: the swept keys.
  Returns:
    Rows ``{key: value ..., 'n', 'final_mean', 'final_std', 'best_mean',
    'best_std'}`` (std: sample standard deviation, 0 for one run).
  """
  others = [k for k in keys if k != 'seed']
  rows = defaultdict(list)
  for r in results:
    rows[json.dumps([r['values'][k] for k in others])].append(r)
  out = []
  for rs in rows.values():
    row = {k: rs[0]['values'][k] for k in others}
    row['n'] = len(rs)
    for name, col in (('final', 'test_accuracy'), ('best', 'best_test_accuracy')):
      xs = [r[col] for r in rs]
      mean = sum(xs) / len(xs)
      std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
      row[f'{name}_mean'], row[f'{name}_std'] = mean, std
    out.append(row)
  return out


def write(workdir: str, results: list[dict], keys: list[str], plots: bool = True) -> list[str]:
  """Writes ``results.csv``, ``results.md`` and (with matplotlib) ``sweep.png``
  (accuracy against each swept key, mean +- std over seeds) and
  ``curves.png`` (every variant's training curves).

  Args:
    workdir: the sweep's directory.
    results: the variants' results, in sweep order.
    keys: the swept keys (table columns).
    plots: draw the PNGs.
  Returns:
    The paths written.
  """
  paths = [os.path.join(workdir, 'results.csv'), os.path.join(workdir, 'results.md')]
  with open(paths[0], 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['variant', *keys, *COLUMNS])
    for r in results:
      w.writerow([r['variant'], *[r['values'][k] for k in keys], *[r.get(c) for c in COLUMNS]])
  summary = summarize(results, keys)
  others = [k for k in keys if k != 'seed']
  lines = ['| variant | ' + ' | '.join(keys) + ' | final test acc | best test acc (step) | '
           'trainable | model bytes | group of | group wall s |',
           '|' + ' --- |' * (len(keys) + 7)]
  for r in results:
    lines.append(f'| {r["variant"]} | ' + ' | '.join(_fmt(r['values'][k]) for k in keys) +
                 f' | {r["test_accuracy"]:.4f} | {r["best_test_accuracy"]:.4f} '
                 f'({r["best_step"]}) | {r["trainable"]} | {r["model_bytes"]} | '
                 f'{r["group_size"]} | {r["group_wall_s"]:.1f} |')
  if 'seed' in keys:
    lines += ['', 'Over seeds (mean ± sample std):', '',
              '| ' + ' | '.join(others + ['seeds', 'final test acc', 'best test acc']) + ' |',
              '|' + ' --- |' * (len(others) + 3)]
    for row in summary:
      cells = [_fmt(row[k]) for k in others] + [
          str(row['n']), f'{100 * row["final_mean"]:.2f} ± {100 * row["final_std"]:.2f}',
          f'{100 * row["best_mean"]:.2f} ± {100 * row["best_std"]:.2f}']
      lines.append('| ' + ' | '.join(cells) + ' |')
  with open(paths[1], 'w') as f:
    f.write('\n'.join(lines) + '\n')
  if not plots:
    return paths
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return paths
  from pemn_jax.plot import plot
  paths.append(plot([os.path.join(workdir, r['variant']) for r in results],
                    os.path.join(workdir, 'curves.png')))
  if others:
    fig, axes = plt.subplots(1, len(others), figsize=(4.5 * len(others), 3.6), squeeze=False)
    for ax, key in zip(axes[0], others, strict=True):
      xs = [row[key] if not isinstance(row[key], list) else 'x'.join(map(str, row[key]))
            for row in summary]
      numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
      pos = list(range(len(xs))) if not numeric else xs
      for name in ('final', 'best'):
        ys = [100 * row[f'{name}_mean'] for row in summary]
        es = [100 * row[f'{name}_std'] for row in summary]
        ax.errorbar(pos, ys, yerr=es, marker='o', capsize=3, label=f'{name} test acc',
                    linestyle='' if len(others) > 1 else '-')
      if numeric and min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale('log')
      if not numeric:
        ax.set_xticks(pos)
        ax.set_xticklabels([str(x) for x in xs], rotation=30)
      ax.set_xlabel(key)
      ax.set_ylabel('test accuracy (%)')
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(workdir, 'sweep.png')
    fig.savefig(out, dpi=110)
    plt.close(fig)
    paths.append(out)
  return paths

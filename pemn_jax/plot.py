"""Training curves of one or several runs, from their metrics.jsonl, into a PNG.

    python -m pemn_jax.plot WORKDIR [WORKDIR ...] --out curves.png

Panels: training loss, training accuracy, test accuracy, and any other logged
scalar present in a run (e.g. gate_sparsity) when --metrics names it; one
line per run, labelled by its directory name. Needs matplotlib
(``pip install pemn_jax[bench]``).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags


def _define_flags():
  """The command's flags, defined only when it runs: sweeps import ``plot``
  as a library, where global flags would collide with another command's
  (``evolve``'s ``--out``) in the same process."""
  flags.DEFINE_string('out', 'curves.png', 'PNG to write.')
  flags.DEFINE_list('metrics', ['loss', 'accuracy', 'test_accuracy'],
                    'Scalars to plot, one panel each.')


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} has no metrics.jsonl (not a training run?)')
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:  # a line cut by a crash
        continue
  return out


def plot(workdirs, out: str, metrics=('loss', 'accuracy', 'test_accuracy')) -> str:
  """Draws ``metrics`` (one panel each) of every run into ``out``.

  Args:
    workdirs: training runs.
    out: the PNG path.
    metrics: scalar names (records without one are skipped).
  Returns:
    ``out``.
  """
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError as e:
    raise RuntimeError('plotting needs matplotlib: pip install pemn_jax[bench]') from e
  runs = {os.path.basename(os.path.normpath(w)) or w: read_metrics(w) for w in workdirs}
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
  for ax, name in zip(axes[0], metrics, strict=True):
    for label, recs in runs.items():
      pts = [(r['step'], r[name]) for r in recs if name in r]
      if pts:
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, values, marker='o' if len(pts) < 20 else None, label=label)
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('usage: python -m pemn_jax.plot WORKDIR [WORKDIR ...] --out curves.png')
  try:
    path = plot(argv[1:], flags.FLAGS.out, flags.FLAGS.metrics)
  except (FileNotFoundError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {path}')


if __name__ == '__main__':
  from pemn_jax import cli
  _define_flags()
  cli.run(main)

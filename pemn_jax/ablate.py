"""Ablation sweeps: many variants of one config; those whose shapes agree train
as one vmapped, jitted step on the same batches.

    python -m pemn_jax.ablate --config configs/quickstart.py --sweep seed=0,1,2 --workdir /tmp/s
    python -m pemn_jax.ablate --config configs/rpg.py --sweep arg.dof=0.01,0.05 --workdir /tmp/d

--sweep key=v1,v2,... (repeatable; the variants are the product): a dotted
config key (seed, optimizer.lr, optimizer.weight_decay, param.keep,
param.sparsity, param.source.ratio, ...) or arg.NAME, an argument of the
config file's get_config. Variants differing only in seed, learning rate,
weight decay, mask keep or gate sparsity train side by side (vmapped); others
run one group after another. --set key=value sets a config key in every
variant. Each variant is a run directory under --workdir
(export / evaluate it like any run); results.csv, results.md, sweep.png and
curves.png summarize the sweep. The same command resumes a stopped sweep
without redoing finished variants; SIGTERM/SIGINT checkpoint every variant
of the group in training and exit 0. Exit status (pemn_jax/cli.py): 0 done or
stopped with its state saved, 2 bad sweep / config / data / checkpoint /
workdir, 3 a variant diverged.
"""

from __future__ import annotations

from absl import app, flags

_CONFIG = flags.DEFINE_string('config', None, 'Config file, FILE[:key=value,...].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory (one run per variant).')
_SWEEP = flags.DEFINE_multi_string('sweep', None, 'key=v1,v2,... (repeatable).')
_SET = flags.DEFINE_multi_string('set', [], 'key=value set in every variant (repeatable), '
                                 'e.g. --set num_steps=500.')
_MAX_GROUP = flags.DEFINE_integer('max_group', 0,
                                  'At most this many variants per vmapped step (0: no limit).',
                                  lower_bound=0)
_PLOTS = flags.DEFINE_bool('plots', True, 'Write sweep.png and curves.png (matplotlib).')
flags.mark_flags_as_required(['config', 'workdir', 'sweep'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from pemn_jax.cli import configure_cpu
  from pemn_jax.sweep.spec import load_config
  try:
    config = load_config(_CONFIG.value)
  except Exception:  # noqa: BLE001 - run_sweep below reports a bad config
    config = None
  configure_cpu(config)  # one variant's activations: a lower bound for a stacked step
  import tensorflow_datasets as tfds
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  from pemn_jax.cli import exit_statuses
  from pemn_jax.sweep import run_sweep

  with exit_statuses():
    run_sweep(_CONFIG.value, _SWEEP.value, _WORKDIR.value,
              say=lambda msg: print(msg, flush=True), plots=_PLOTS.value,
              max_group=_MAX_GROUP.value, overrides=_SET.value)  # None if stopped: exit 0


if __name__ == '__main__':
  from pemn_jax import cli
  cli.run(main)

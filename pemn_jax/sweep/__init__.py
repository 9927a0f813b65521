"""Sweeps: many variants of one config, vmapped where their shapes agree.

    from pemn_jax.sweep import run_sweep
    results = run_sweep('configs/pemn.py:model=mlp,dataset=mnist', ['seed=0,1,2'], '/tmp/sweep')

``spec`` expands and groups the variants, ``run`` trains a group as one
vmapped step, ``report`` writes the tables and plots. The command line is
``python -m pemn_jax.ablate``.
"""

from __future__ import annotations

import json
import os
import time

import jax

from pemn_jax.config import ConfigError
from pemn_jax.sweep import report
from pemn_jax.sweep.run import finished, resume_step, train_group
from pemn_jax.sweep.spec import expand, group, parse_sweeps
from pemn_jax.train.workdir import WorkdirLock, prepare

DEFINITION = 'sweep.json'


def run_sweep(config_spec: str, sweeps, workdir: str, say=print, plots: bool = True,
              max_group: int = 0, overrides=()) -> list[dict]:
  """Trains every variant of a sweep, resuming a stopped one.

  Args:
    config_spec: ``FILE[:ARG]`` (a config file with ``get_config``).
    sweeps: ``['key=v1,v2,...', ...]``; keys are dotted config keys or
      ``arg.NAME`` (an argument of ``get_config``).
    workdir: the sweep's directory: one run directory per variant,
      ``sweep.json``, ``results.csv``/``results.md``, ``sweep.png``,
      ``curves.png``.
    say: progress output.
    plots: write the PNGs (needs matplotlib).
    max_group: at most this many variants in one vmapped step (0: no limit).
    overrides: ``['key=value', ...]`` set in every variant's config.
  Returns:
    Each variant's result, in sweep order.
  Raises:
    ConfigError (bad sweep, or the workdir holds another sweep), DataError,
    CheckpointError, WorkdirError, DivergenceError.
  """
  if jax.process_count() > 1:
    raise ConfigError('sweeps run in one process (its devices share each batch); run one '
                      'sweep per process or host')
  parsed = parse_sweeps(sweeps)
  variants = expand(config_spec, parsed, overrides)
  keys = [k for k, _ in parsed]
  workdir = prepare(workdir)
  definition = {'config': config_spec, 'sweeps': [f'{k}={",".join(v)}' for k, v in parsed],
                'set': list(overrides)}
  with WorkdirLock(workdir):
    path = os.path.join(workdir, DEFINITION)
    if os.path.exists(path):
      with open(path) as f:
        try:
          stored = json.load(f)
        except ValueError:
          stored = None
      if stored != definition:
        raise ConfigError(f'{workdir} holds another sweep ({stored}); use another --workdir')
    else:
      with open(path + '.tmp', 'w') as f:
        json.dump(definition, f, indent=1)
      os.replace(path + '.tmp', path)
    groups = []
    for g in group(variants):
      todo = [v for v in g if finished(workdir, v) is None]
      by_step = {}
      for v in todo:  # variants resuming from different steps continue apart
        by_step.setdefault(resume_step(workdir, v), []).append(v)
      for part in by_step.values():
        size = max_group or len(part)
        groups += [part[i:i + size] for i in range(0, len(part), size)]
    done = len(variants) - sum(len(g) for g in groups)
    say(f'sweep: {len(variants)} variants in {len(group(variants))} vmappable group(s); '
        f'{done} already finished; {len(groups)} group(s) to train')
    t0 = time.time()
    for gi, g in enumerate(groups):
      g_t0 = time.time()

      def progress(step, total, losses, gi=gi, g=g, g_t0=g_t0):
        frac = (gi + step / total) / len(groups)
        eta = (time.time() - t0) * (1 - frac) / max(frac, 1e-9)
        say(f'[group {gi + 1}/{len(groups)}, {len(g)} variants] step {step}/{total} loss '
            + ' '.join(f'{x:.3f}' for x in losses) + f' | sweep {100 * frac:.0f}% '
            f'{time.time() - g_t0:.0f}s eta {eta:.0f}s')

      for r in train_group(g, workdir, say, progress):
        say(f'{r["variant"]}: test accuracy {r["test_accuracy"]:.4f} (best '
            f'{r["best_test_accuracy"]:.4f} at step {r["best_step"]})')
    results = [finished(workdir, v) for v in variants]
    missing = [v.name for v, r in zip(variants, results, strict=True) if r is None]
    if missing:
      raise ConfigError(f'variants without results after training: {missing}')
    written = report.write(workdir, results, keys, plots)
    say('wrote ' + ', '.join(written))
    return results


__all__ = ['expand', 'group', 'parse_sweeps', 'run_sweep']

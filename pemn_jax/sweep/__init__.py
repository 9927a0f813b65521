"""Sweeps: many variants of one config, vmapped where their shapes agree.

    from pemn_jax.sweep import run_sweep
    results = run_sweep('configs/pemn.py:model=mlp,dataset=mnist', ['seed=0,1,2'], '/tmp/sweep')

``spec`` expands the variants and groups those whose configs differ only in
traced values; each group goes to the trainer's own loop
(``pemn_jax.train.loop.train``: one vmapped step, its resume, signals and
records); ``report`` writes tables and plots. Each variant is an ordinary
run directory ``WORKDIR/<variant>/`` (a standalone config; ``result.json``
once finished); a restarted sweep skips finished variants and resumes the
others. The command line is ``python -m pemn_jax.ablate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax

from pemn_jax.config import ConfigError, without_legacy
from pemn_jax.pytrees import plain
from pemn_jax.sweep import report
from pemn_jax.sweep.spec import Variant, expand, group, parse_sweeps
from pemn_jax.train.loop import Member, Progress, train
from pemn_jax.train.run import Run, make_param
from pemn_jax.train.workdir import WorkdirLock, prepare

DEFINITION = 'sweep.json'
RESULT = 'result.json'


def finished(workdir: str, variant: Variant) -> dict | None:
  """The variant's stored result, or None when it has not finished."""
  path = os.path.join(workdir, variant.name, RESULT)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  stored = without_legacy(out.get('config') or {})
  return out if stored == plain(variant.config.to_dict()) else None


class _SweepProgress(Progress):
  """A group's progress within the whole sweep."""

  def __init__(self, say, index: int, groups: int, t0: float):
    super().__init__(say)
    self.index, self.groups, self.t0, self.g_t0 = index, groups, t0, time.time()

  def start(self, run, members, start):
    if not start:
      self.say(f'group of {len(members)}: {run.config.model} x {run.config.param.name}, '
               f'N={run.param.num_params}, {run.total} steps; variants: '
               + ', '.join(m.label for m in members))

  def log(self, step, total, records, eta):
    del eta
    frac = (self.index + step / total) / self.groups
    eta = (time.time() - self.t0) * (1 - frac) / max(frac, 1e-9)
    self.say(f'[group {self.index + 1}/{self.groups}, {len(records)} variants] step {step}/'
             f'{total} loss ' + ' '.join(f'{r["loss"]:.3f}' for r in records)
             + f' | sweep {100 * frac:.0f}% {time.time() - self.g_t0:.0f}s eta {eta:.0f}s')

  def evaluated(self, step, lasts):
    pass


def train_group(variants: list[Variant], workdir: str, say=print,
                progress: Progress | None = None) -> list[dict]:
  """Trains a group of variants (equal signatures) side by side, each in
  ``workdir/<name>`` (locked while it trains), and writes the ``result.json``
  of each that finishes.

  Args:
    variants: the group (``spec.group``); their configs differ in traced keys only.
    workdir: the sweep's directory.
    say: progress output.
    progress: what to print (default: the trainer's lines).
  Returns:
    Each variant's result; ``stopped`` is True where a signal or
    ``stop_at_step`` stopped it (no ``result.json`` then).
  Raises:
    ConfigError, DataError, CheckpointError, WorkdirError, DivergenceError.
  """
  configs = [v.config for v in variants]
  run = Run.build(configs[0], decay=any(float(c.optimizer.weight_decay) > 0 for c in configs))
  dirs = [prepare(os.path.join(workdir, v.name)) for v in variants]
  members = [Member(d, c, run.param if i == 0 else
                    make_param(c, run.model, run.train_ds.image_shape, run.total), v.name)
             for i, (d, c, v) in enumerate(zip(dirs, configs, variants, strict=True))]
  t0 = time.time()
  out = []
  with contextlib.ExitStack() as locks:  # each variant's directory locked until its result is in
    for d in dirs:
      locks.enter_context(WorkdirLock(d))
    results = train(run, members, say, progress)
    wall = time.time() - t0
    for v, d, r in zip(variants, dirs, results, strict=True):
      res = {'variant': v.name, 'values': v.values, **r, 'group_size': len(variants),
             'group_wall_s': wall, 'config': plain(v.config.to_dict())}
      if not r['stopped'] and jax.process_index() == 0:
        tmp = os.path.join(d, RESULT + '.tmp')
        with open(tmp, 'w') as f:
          json.dump(res, f, indent=1, default=str)
        os.replace(tmp, os.path.join(d, RESULT))
      out.append(res)
  return out


def run_sweep(config_spec: str, sweeps, workdir: str, say=print, plots: bool = True,
              max_group: int = 0, overrides=()) -> list[dict] | None:
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
    Each variant's result, in sweep order; None when a signal (or
    ``stop_at_step``) stopped the sweep, its state saved (the same call
    continues it).
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
    _check_definition(workdir, definition)
    groups = []
    for g in group(variants):
      todo = [v for v in g if finished(workdir, v) is None]
      size = max_group or len(todo) or 1
      groups += [todo[i:i + size] for i in range(0, len(todo), size)]
    done = len(variants) - sum(len(g) for g in groups)
    say(f'sweep: {len(variants)} variants in {len(group(variants))} vmappable group(s); '
        f'{done} already finished; {len(groups)} group(s) to train')
    t0 = time.time()
    for gi, g in enumerate(groups):
      results = train_group(g, workdir, say, _SweepProgress(say, gi, len(groups), t0))
      for r in results:
        if r['stopped']:
          say(f'{r["variant"]}: stopped at step {r["step"]} with a checkpoint')
          continue
        say(f'{r["variant"]}: test accuracy {r["test_accuracy"]:.4f} (best '
            f'{r["best_test_accuracy"]:.4f} at step {r["best_step"]})')
      if any(r['stopped'] for r in results):
        say('sweep stopped; run the same command to continue')
        return None
    results = [finished(workdir, v) for v in variants]
    missing = [v.name for v, r in zip(variants, results, strict=True) if r is None]
    if missing:
      raise ConfigError(f'variants without results after training: {missing}')
    written = report.write(workdir, results, keys, plots)
    say('wrote ' + ', '.join(written))
    return results


def _check_definition(workdir: str, definition: dict):
  """Records the sweep's definition in ``workdir``, or refuses another one's."""
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


__all__ = ['expand', 'group', 'parse_sweeps', 'run_sweep', 'train_group']

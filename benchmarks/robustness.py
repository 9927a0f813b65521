"""Robustness campaign: how runs and model files behave under damage.

Counts, per class of damage, the cases that were handled correctly and the
failures (anything else: a wrong result, another exception type, a hang):

* ``model_files``: mutated ``.pemn`` files with *valid* checksums (random header
  values, deleted fields, flipped section bytes, truncated sections) -- correct
  = the library's ArtifactError, or a load whose params have the model's shapes
  and finite values, within 30 s;
* ``checkpoint_flips``: one random byte of the latest checkpoint flipped, then
  the run resumed to its end -- correct = it ends with the state of an
  undamaged run (resumed from a good step), or refuses with CheckpointError and
  leaves the files as they were;
* ``kills``: ``kill -9`` at a random moment of a run (training or checkpoint
  writing), then the same command again -- correct = it ends with the state of
  an undisturbed run;
* ``bad_configs``: invalid values -- correct = ConfigError naming the key;
* ``cost_headers``: tiny model files (a header, no section data) declaring
  models of random widths, depths, class counts and input sizes -- correct =
  ArtifactError within 30 s with the process's peak memory under 3 GiB;
* ``filesystem``: a full disk while training and while exporting (a tmpfs;
  root only), a read-only checkpoint directory (a read-only bind mount; root
  only), workdir entries of the wrong type, a killed save's temporary
  directory, export of a run whose newest step is corrupt -- correct = exit 2
  with one line and no traceback within 90 s, earlier checkpoints intact (or,
  for the last two, success: the directory cleaned, the previous step used);
* ``cli_mistakes``: config mistakes on the command line (a model path that is
  no model, zero/negative widths, an unreadable data_dir, unknown keys and
  preset arguments, unparsable values, a model whose train state no host
  holds) -- correct = exit 2, the key named, no traceback.

    .venv/bin/python benchmarks/robustness.py                    # ~25 min
    .venv/bin/python benchmarks/robustness.py --smoke            # a few cases each

Last lines: ``<class> tried=<n> correct=<c> failures=<f>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path[:0] = [REPO]

PEMN = {'name': 'masked', 'keep': 0.2, 'source': {'name': 'prototype', 'mode': 'rp',
                                                  'ratio': 0.05}}


def config(steps: int, **over):
  from pemn_jax.config import base_config
  c = base_config()
  c.dataset, c.model = 'mnist', 'mlp'
  c.model_kwargs.hidden = (32,)
  c.param = PEMN
  c.train_limit, c.test_limit = 1024, 200
  c.batch_size, c.eval_batch_size = 32, 100
  c.num_steps, c.log_every, c.checkpoint_every = steps, 4, 4
  c.optimizer.update(name='adamw', lr=0.05, schedule='constant')
  for k, v in over.items():
    c[k] = v
  return c


def final_state(workdir):
  import jax
  import numpy as np

  from pemn_jax.train.run import restore
  ts = restore(workdir).train_state
  return [np.asarray(x) for x in jax.tree.leaves(ts.state)]


def same(a, b) -> bool:
  import numpy as np
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def model_files(n, tmp, rng):
  import jax
  import numpy as np

  from pemn_jax.export import artifact
  from pemn_jax.export.model_file import export_run, load
  from pemn_jax.train.loop import train_and_evaluate
  wd = os.path.join(tmp, 'mf')
  train_and_evaluate(config(8), wd)
  good = os.path.join(tmp, 'good.pemn')
  export_run(wd, good, params_dir=None)
  data = open(good, 'rb').read()
  pre = struct.Struct('<8sII')
  _, version, hl = pre.unpack_from(data)
  header = artifact.decode_header(data[pre.size:pre.size + hl])
  sections = data[pre.size + hl:-32]
  ref = [x.shape for x in jax.tree.leaves(load(good)[2])]
  values = [None, True, -1, 0, 2**40, 1e308, float('nan'), float('inf'), '', '(a+)+$', '@stages',
            [], [1] * 10, {}, {'name': 'dense'}, 'mlp', 'rans', 7, 0.5, [2**31, 2]]

  def paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
      for k, v in x.items():
        yield from paths(v, prefix + (k,))
    elif isinstance(x, list):
      for i, v in enumerate(x):
        yield from paths(v, prefix + (i,))
  all_paths = [p for p in paths(header) if p]
  ok = bad = 0
  for i in range(n):
    h, body = json.loads(json.dumps(header)), bytearray(sections)
    kind = rng.choice(['value', 'value', 'delete', 'bytes', 'truncate'])
    if kind in ('value', 'delete'):
      p = rng.choice(all_paths)
      node = h
      try:
        for k in p[:-1]:
          node = node[k]
        if kind == 'delete':
          del node[p[-1]]
        else:
          node[p[-1]] = rng.choice(values)
      except (KeyError, IndexError, TypeError):
        pass
    elif kind == 'bytes':
      for _ in range(rng.randint(1, 8)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    else:
      body = body[:rng.randrange(len(body))]
    head = zlib.compress(json.dumps(h).encode())  # (NaN/inf values: not strict JSON)
    blob = pre.pack(artifact.MAGIC, version, len(head)) + head + bytes(body)
    path = os.path.join(tmp, f'm{i}.pemn')
    with open(path, 'wb') as f:
      f.write(blob + hashlib.sha256(blob).digest())
    t0 = time.time()
    try:
      _, _, params, _ = load(path)
      good_load = [x.shape for x in jax.tree.leaves(params)] == ref and all(
          bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(params))
    except artifact.ArtifactError:
      good_load = True
    except Exception as e:  # noqa: BLE001 - counted as a failure
      print(f'# model_files case {i} ({kind}): {type(e).__name__}: {e}', flush=True)
      good_load = False
    good_load &= time.time() - t0 < 30
    ok, bad = ok + good_load, bad + (not good_load)
  return n, ok, bad


def checkpoint_flips(n, tmp, rng):
  from pemn_jax.train.checkpoint import CheckpointError
  from pemn_jax.train.loop import train_and_evaluate
  straight = os.path.join(tmp, 'straight')
  train_and_evaluate(config(16), straight)
  want = final_state(straight)
  base = os.path.join(tmp, 'base')
  train_and_evaluate(config(16, stop_at_step=12), base)
  ok = bad = 0
  for i in range(n):
    wd = os.path.join(tmp, f'flip{i}')
    shutil.copytree(base, wd)
    step_dir = os.path.join(wd, 'checkpoints', '12')
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    target = rng.choice(files)
    data = bytearray(open(target, 'rb').read())
    if data:
      data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
      open(target, 'wb').write(bytes(data))
    snapshot = {p: open(p, 'rb').read() for p in
                (os.path.join(d, f) for d, _, fs in os.walk(os.path.join(wd, 'checkpoints'))
                 for f in fs)}
    try:
      train_and_evaluate(config(16), wd)
      good = same(final_state(wd), want)
    except CheckpointError:  # refused: must have left the files as they were
      now = {p: open(p, 'rb').read() for p in
             (os.path.join(d, f) for d, _, fs in os.walk(os.path.join(wd, 'checkpoints'))
              for f in fs)}
      good = now == snapshot
    except Exception as e:  # noqa: BLE001 - counted as a failure
      print(f'# checkpoint_flips case {i} ({target}): {type(e).__name__}: {e}', flush=True)
      good = False
    if not good:
      print(f'# checkpoint_flips case {i}: wrong result ({os.path.relpath(target, wd)})',
            flush=True)
    ok, bad = ok + good, bad + (not good)
  return n, ok, bad


def kills(n, tmp, rng):
  steps = 40
  args = ['--config', 'configs/quickstart.py', '--config.dataset=mnist',
          '--config.model_kwargs.hidden=(32,)', '--config.train_limit=1024',
          '--config.test_limit=200', '--config.batch_size=32', '--config.eval_batch_size=100',
          f'--config.num_steps={steps}', '--config.log_every=4', '--config.checkpoint_every=4',
          '--config.optimizer.lr=0.05', '--config.optimizer.schedule=constant',
          '--config.optimizer.weight_decay=0.0', '--config.param.keep=0.2',
          '--config.param.source.ratio=0.05', '--config.param.source.rescale=false']
  straight = os.path.join(tmp, 'kstraight')
  subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args, f'--workdir={straight}'],
                 cwd=REPO, check=True, capture_output=True, timeout=600)
  want = final_state(straight)
  ok = bad = 0
  for i in range(n):
    wd = os.path.join(tmp, f'kill{i}')
    p = subprocess.Popen([sys.executable, '-m', 'pemn_jax.main', *args, f'--workdir={wd}'],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(3.0, 12.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args, f'--workdir={wd}'],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    good = r.returncode == 0 and same(final_state(wd), want)
    if not good:
      print(f'# kills case {i}: rc={r.returncode} {r.stderr[-300:]}', flush=True)
    ok, bad = ok + good, bad + (not good)
  return n, ok, bad


BAD = [('seed', 2**40), ('seed', -3), ('optimizer.lr', float('inf')), ('optimizer.lr', -1.0),
       ('optimizer.lr', float('nan')), ('optimizer.weight_decay', float('nan')),
       ('optimizer.momentum', 1.0), ('optimizer.name', 'rmsprop'), ('optimizer.schedule', 'step'),
       ('optimizer.decay_epochs', -1.0), ('optimizer.warmup_steps', -5),
       ('optimizer.grad_clip', float('inf')), ('batch_size', 0), ('batch_size', -32),
       ('eval_batch_size', 0), ('num_steps', -1), ('num_steps', 0), ('num_epochs', 0.0),
       ('num_epochs', float('inf')), ('train_limit', 5), ('test_limit', -1), ('log_every', 0),
       ('checkpoint_every', 0), ('keep_checkpoints', 0), ('dataset', 'svhn'),
       ('model', 'alexnet'), ('augment', 'cutmix'), ('augment_options.erase', 1.5),
       ('augment_options.ra_ops', 99), ('augment_options.jitter', float('nan')),
       ('prune.criterion', 'lottery'), ('prune.sparsity', 1.0), ('prune.allocation', 'x'),
       ('prune.every', 0), ('prune.begin_fraction', 2.0),
       ('param', {'name': 'ring', 'dof': 10**9}), ('param', {'name': 'ring', 'dof': 0.0}),
       ('param', {'name': 'masked', 'keep': 1.5}), ('param', {'name': 'masked', 'keep': 0.0}),
       ('param', {'name': 'nope'}), ('param', {'name': 'ring', 'dof': 10, 'select': '(unclosed'}),
       ('param', {'name': 'prototype', 'mode': 'rp', 'ratio': 0.0}),
       ('param', {'name': 'masked', 'kind': 'supermask', 'eval': 'mean'}),
       ('model_kwargs', {'hidden': (32,), 'depth': 3})]


def tally(name, cases) -> tuple[int, int, int]:
  """(tried, correct, failures) of ``cases``, ``(label, case)`` pairs where
  ``case()`` says whether it was handled; one that raises is a failure. Each
  failure is printed with its label."""
  ok = 0
  for label, case in cases:
    try:
      good = bool(case())
    except Exception as e:  # noqa: BLE001 - counted as a failure
      print(f'# {name} {label}: {type(e).__name__}: {e}', flush=True)
      good = False
    if not good:
      print(f'# {name} {label}: not handled', flush=True)
    ok += good
  return len(cases), ok, len(cases) - ok


def bad_configs(tmp):
  from pemn_jax.config import ConfigError
  from pemn_jax.train.loop import train_and_evaluate

  def case(i, key, value):
    c = config(2)
    a, _, b = key.partition('.')
    try:
      if b:
        c[a][b] = value
      else:
        c[a] = value
    except (TypeError, ValueError):  # ConfigDict's own type check refuses it
      return True
    try:
      train_and_evaluate(c, os.path.join(tmp, f'bad{i}'))
      return False
    except ConfigError as e:
      return a in str(e)  # refused by name
  return tally('bad_configs', [(f'{k}={v!r}', lambda i=i, k=k, v=v: case(i, k, v))
                               for i, (k, v) in enumerate(BAD)])


def cost_headers(n, tmp, rng):
  import resource

  from pemn_jax.export import artifact
  from pemn_jax.export.model_file import load
  pre = struct.Struct('<8sII')
  ok = bad = 0
  for i in range(n):
    model = rng.choice(['mlp', 'lenet5', 'vit', 'convmixer', 'resnet20'])
    kwargs = {'mlp': lambda: {'hidden': [2 ** rng.randint(4, 16)] * rng.randint(1, 3)},
              'lenet5': dict, 'resnet20': lambda: {'width': 2 ** rng.randint(3, 12)},
              'vit': lambda: {'depth': 2 ** rng.randint(1, 16), 'dim': 48, 'num_heads': 3},
              'convmixer': lambda: {'dim': 2 ** rng.randint(4, 14),
                                    'depth': 2 ** rng.randint(1, 12)}}[model]()
    side = 2 ** rng.randint(5, 13)
    header = {'format': 'pemn_jax model', 'pemn_jax_version': '0', 'jax_version': '0',
              'model': model, 'model_kwargs': kwargs, 'num_classes': 10 ** rng.randint(1, 6),
              'input_shape': [side, side, 3], 'param': {'name': 'dense'}, 'seed': 0,
              'dataset': 'cifar10', 'step': 0, 'sections': []}
    head = artifact.encode_header(header)
    blob = pre.pack(artifact.MAGIC, artifact.FORMAT_VERSION, len(head)) + head
    path = os.path.join(tmp, f'c{i}.pemn')
    with open(path, 'wb') as f:
      f.write(blob + hashlib.sha256(blob).digest())
    t0 = time.time()
    try:
      load(path)
      good = False
    except artifact.ArtifactError:
      good = True
    except Exception as e:  # noqa: BLE001 - counted as a failure
      print(f'# cost_headers case {i} {model} {kwargs}: {type(e).__name__}: {e}', flush=True)
      good = False
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
    good &= time.time() - t0 < 30 and peak < 3
    if not good:
      print(f'# cost_headers case {i} {model} {kwargs} {side}px: {time.time() - t0:.1f} s, '
            f'peak {peak:.2f} GiB', flush=True)
    ok, bad = ok + good, bad + (not good)
  return n, ok, bad


def _cli(module, args, env=None, timeout=90):
  try:
    return subprocess.run([sys.executable, '-m', f'pemn_jax.{module}', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return None


def _one_line_exit_2(p, *words) -> bool:
  return (p is not None and p.returncode == 2 and 'Traceback' not in p.stderr
          and all(w in p.stderr for w in words))


def filesystem(tmp, limit=None):
  """Each case: (name, callable -> bool); those needing root are skipped
  (not counted) elsewhere. ``limit``: only the first cases."""
  root = os.geteuid() == 0 and shutil.which('mount') is not None
  args = ['--config', 'configs/quickstart.py', '--config.dataset=mnist',
          '--config.model_kwargs.hidden=(32,)', '--config.train_limit=512',
          '--config.test_limit=100', '--config.batch_size=32', '--config.eval_batch_size=100',
          '--config.log_every=4', '--config.checkpoint_every=4', '--config.num_steps=16']

  def trained(wd):
    p = _cli('main', [*args, '--config.stop_at_step=4', f'--workdir={wd}'])
    assert p is not None and p.returncode == 0, p and p.stderr[-500:]
    return wd

  def steps(wd):
    return sorted(int(x) for x in os.listdir(os.path.join(wd, 'checkpoints')) if x.isdigit())

  def full(what):
    disk = os.path.join(tmp, f'disk_{what}')
    os.makedirs(disk)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', disk], check=True)
    try:
      wd = trained(os.path.join(disk, 'run'))
      with open(os.path.join(disk, 'filler'), 'wb', buffering=0) as f:
        try:
          while True:
            f.write(b'\0' * 65536)
        except OSError:
          pass
      with open(os.path.join(disk, 'filler'), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(disk, 'filler')) - (64 << 10))
      if what == 'train':
        p = _cli('main', [*args, f'--workdir={wd}'])
        return _one_line_exit_2(p, 'No space left') and steps(wd) == [4]
      out = os.path.join(disk, 'm.pemn')
      p = _cli('export', [f'--workdir={wd}', f'--out={out}'])
      return _one_line_exit_2(p, 'No space left') and not [
          x for x in os.listdir(disk) if x.startswith('m.pemn')]
    finally:
      subprocess.run(['umount', '-l', disk])

  def read_only():
    wd = trained(os.path.join(tmp, 'ro'))
    ck = os.path.join(wd, 'checkpoints')
    subprocess.run(['sh', '-c', f'mount --bind "{ck}" "{ck}" && mount -o remount,ro,bind "{ck}"'],
                   check=True)
    try:
      return _one_line_exit_2(_cli('main', [*args, f'--workdir={wd}']), 'not writable')
    finally:
      subprocess.run(['umount', '-l', ck])

  def wrong_type(entry, make):
    wd = os.path.join(tmp, 'wt_' + entry.replace('/', '_'))
    os.makedirs(os.path.join(wd, os.path.dirname(entry)), exist_ok=True)
    if make == 'file':
      open(os.path.join(wd, entry), 'w').close()
    else:
      os.makedirs(os.path.join(wd, entry))
    return _one_line_exit_2(_cli('main', [*args, f'--workdir={wd}']), entry)

  def stale_temp():
    wd = trained(os.path.join(tmp, 'stale'))
    os.makedirs(os.path.join(wd, 'checkpoints', '7.orbax-checkpoint-tmp-1700000000'))
    p = _cli('main', [*args, f'--workdir={wd}'])
    return (p is not None and p.returncode == 0
            and not [x for x in os.listdir(os.path.join(wd, 'checkpoints')) if 'tmp' in x])

  def corrupt_newest():
    wd = trained(os.path.join(tmp, 'corrupt'))
    p = _cli('main', [*args, '--config.stop_at_step=8', f'--workdir={wd}'])
    meta = os.path.join(wd, 'checkpoints', '8', 'meta', 'metadata')
    m = json.load(open(meta))
    m['best'] = {'test_accuracy': 1.0}
    json.dump(m, open(meta, 'w'))
    p = _cli('export', [f'--workdir={wd}', f'--out={os.path.join(tmp, "c.pemn")}'])
    return p is not None and p.returncode == 0 and 'using step 4' in p.stdout + p.stderr

  cases = [('checkpoints is a file', lambda: wrong_type('checkpoints', 'file')),
           ('checkpoints/rejected is a file', lambda: wrong_type('checkpoints/rejected', 'file')),
           ('metrics.jsonl is a directory', lambda: wrong_type('metrics.jsonl', 'dir')),
           ('lock is a directory', lambda: wrong_type('lock', 'dir')),
           ('a killed save\'s temporary directory', stale_temp),
           ('export of a corrupt newest step', corrupt_newest)]
  if root:
    cases += [('full disk while training', lambda: full('train')),
              ('full disk while exporting', lambda: full('export')),
              ('read-only checkpoints', read_only)]
  return tally('filesystem', cases[:limit])


CLI_MISTAKES = [('--config.model=os:getcwd', 'config.model'),
                ('--config.model=os:path', 'config.model'),
                ('--config.model_kwargs.hidden=(0,)', 'config.model_kwargs'),
                ('--config.model_kwargs.hidden=(-5,)', 'config.model_kwargs'),
                ('--config.data_dir=/proc/nonexistent/tfds', 'config.data_dir'),
                ('--config.nonexistent=1', 'config.nonexistent'),
                ('--config.param.kind=edge_popup', 'config.param.kind'),
                ('--config.batch_size=abc', 'config.batch_size'),
                ('--config=configs/quickstart.py:nonsense=1', 'nonsense'),
                ('--config=configs/quickstart.py:dense=true --config.model_kwargs.hidden='
                 '(20000000,)', 'config.model_kwargs')]  # a 188 GB train state


def cli_mistakes(tmp, limit=None):
  base = ['--config.train_limit=256', '--config.test_limit=100', '--config.num_steps=2']

  def case(i, flag, named):
    argv = (flag.split() if flag.startswith('--config=') else
            ['--config', 'configs/quickstart.py', *flag.split()]) + base
    p = _cli('main', [*argv, f'--workdir={os.path.join(tmp, f"cli{i}")}'])
    if not _one_line_exit_2(p, named):
      print(f'# cli_mistakes {flag}: rc={p and p.returncode} {p and p.stderr[-300:]}', flush=True)
      return False
    return True
  return tally('cli_mistakes', [(flag, lambda i=i, f=flag, n=named: case(i, f, n))
                                for i, (flag, named) in enumerate(CLI_MISTAKES[:limit])])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model_files', type=int, default=2000)
  ap.add_argument('--checkpoint_flips', type=int, default=40)
  ap.add_argument('--kills', type=int, default=20)
  ap.add_argument('--cost_headers', type=int, default=200)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--classes', nargs='+', default=None, help='only these classes')
  ap.add_argument('--smoke', action='store_true',
                  help='3 cases of each (filesystem and cli_mistakes: 1)')
  args = ap.parse_args()
  if args.smoke:
    args.model_files, args.checkpoint_flips, args.kills, args.cost_headers = 3, 1, 1, 3
  rng = random.Random(args.seed)
  from pemn_jax.data import sources
  sources.load('mnist', 'train'), sources.load('mnist', 'test')  # prepared once, up front
  results = {}
  classes = {'model_files': lambda tmp: model_files(args.model_files, tmp, rng),
             'checkpoint_flips': lambda tmp: checkpoint_flips(args.checkpoint_flips, tmp, rng),
             'kills': lambda tmp: kills(args.kills, tmp, rng), 'bad_configs': bad_configs,
             'cost_headers': lambda tmp: cost_headers(args.cost_headers, tmp, rng),
             # (--smoke: one case each; a case is a few processes, and
             # tests/train/test_filesystem_faults.py and tests/test_cli_errors.py run them all)
             'filesystem': lambda tmp: filesystem(tmp, 1 if args.smoke else None),
             'cli_mistakes': lambda tmp: cli_mistakes(tmp, 1 if args.smoke else None)}
  unknown = set(args.classes or ()) - set(classes)
  if unknown:
    ap.error(f'unknown --classes {sorted(unknown)}; choose from {sorted(classes)}')
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.classes or classes:
      results[name] = classes[name](tmp)
  for name, (n, ok, bad) in results.items():
    print(f'{name} tried={n} correct={ok} failures={bad}')


if __name__ == '__main__':
  main()

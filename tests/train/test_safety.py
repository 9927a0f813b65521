"""Nothing lost, nothing silently wrong: corrupt checkpoints, divergence,
another config's checkpoints, a shared workdir, bad configs and workdirs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import REPO, tiny_config, tree_equal

from pemn_jax import pytrees
from pemn_jax.config import ConfigError, base_config, validate
from pemn_jax.export.model_file import export_run
from pemn_jax.train import checkpoint as ck
from pemn_jax.train.checkpoint import CheckpointError
from pemn_jax.train.loop import DivergenceError, train_and_evaluate
from pemn_jax.train.run import restore
from pemn_jax.train.workdir import WorkdirError

PEMN = {'name': 'masked', 'keep': 0.5, 'source': {'name': 'prototype', 'mode': 'rp',
                                                  'ratio': 1e-2}}


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def largest_file(root):
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return max(files, key=os.path.getsize)


def test_a_flipped_byte_is_detected_and_the_run_falls_back_to_the_newest_good_step(
    mnist_slice, tmp_path, capsys):
  c = tiny_config(mnist_slice, param=PEMN, num_steps=24, checkpoint_every=8,
                  **{'optimizer.lr': 0.05})
  train_and_evaluate(c, str(tmp_path / 'straight'))
  c.stop_at_step = 16
  train_and_evaluate(c, str(tmp_path / 'run'))
  ckdir = tmp_path / 'run' / 'checkpoints'
  assert sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) == [8, 16]
  target = largest_file(ckdir / '16' / 'state')
  data = bytearray(open(target, 'rb').read())
  data[len(data) // 2] ^= 0x01  # one bit of the largest array file
  open(target, 'wb').write(bytes(data))
  corrupt = bytes(data)
  c.stop_at_step = None
  c.keep_checkpoints = 1
  capsys.readouterr()
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  assert out['step'] == 24
  # Orbax restores that byte silently; the digest recorded at save time catches it.
  assert 'differ from the digest' in capsys.readouterr().out
  # The corrupt step was set aside byte for byte, not deleted, and not resumed from.
  rejected = os.listdir(ckdir / 'rejected')
  assert len(rejected) == 1 and rejected[0].startswith('16-')
  moved = os.path.join(ckdir, 'rejected', rejected[0], os.path.relpath(target, ckdir / '16'))
  assert open(moved, 'rb').read() == corrupt
  # Resumed from step 8 and retrained 9..24: the same state as the straight run.
  assert tree_equal(restore(str(tmp_path / 'run')).train_state.state,
                    restore(str(tmp_path / 'straight')).train_state.state)


def test_a_corrupt_config_in_the_metadata_is_a_corrupt_step_not_another_config(
    mnist_slice, tmp_path, capsys):
  """A flipped byte that renames a config key in the newest step's metadata:
  that step is rejected and the run resumes from the one before (it used to
  refuse the workdir as "another config")."""
  c = tiny_config(mnist_slice, num_steps=12, checkpoint_every=4, stop_at_step=8)
  train_and_evaluate(c, str(tmp_path / 'run'))
  meta = tmp_path / 'run' / 'checkpoints' / '8' / 'meta' / 'metadata'
  text = meta.read_bytes()
  assert b'"eval_batch_size"' in text
  meta.write_bytes(text.replace(b'"eval_batch_size"', b'"evil_batch_size"', 1))
  c.stop_at_step = None
  capsys.readouterr()
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  printed = capsys.readouterr().out
  assert out['step'] == 12
  assert 'its metadata differs from the digest' in printed and 'resumed from step 4' in printed
  assert os.listdir(tmp_path / 'run' / 'checkpoints' / 'rejected')[0].startswith('8-')


def test_meta_digest_sees_any_change():
  meta = {'step': 3, 'config': {'lr': 0.1, 'shape': (1, 2)}, 'digest': [1, 2]}
  meta['meta_digest'] = ck.meta_digest(meta)
  assert ck.check_meta(json.loads(json.dumps(meta)), 3, 'd') is not None
  for bad in ({**meta, 'step': 4}, {**meta, 'config': {'lr': 0.1, 'shape': (1, 3)}},
              {**meta, 'digest': [1, 3]}):
    with pytest.raises(CheckpointError, match='metadata differs'):
      ck.check_meta(bad, 3, 'd')


def test_a_corrupt_checkpoint_without_a_good_one_is_refused_and_left_untouched(
    mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, num_steps=8)
  train_and_evaluate(c, str(tmp_path))
  target = largest_file(tmp_path / 'checkpoints' / '8' / 'state')
  data = bytearray(open(target, 'rb').read())
  data[len(data) // 2] ^= 0x40
  open(target, 'wb').write(bytes(data))
  before = {p: open(p, 'rb').read() for p in
            (os.path.join(d, f) for d, _, fs in os.walk(tmp_path / 'checkpoints') for f in fs)}
  c.num_steps = 16
  with pytest.raises(CheckpointError, match='(?s)step 8.*left untouched'):
    train_and_evaluate(c, str(tmp_path))
  after = {p: open(p, 'rb').read() for p in
           (os.path.join(d, f) for d, _, fs in os.walk(tmp_path / 'checkpoints') for f in fs)}
  assert after == before


def test_rotation_never_deletes_the_newest_verified_step(mnist_slice, tmp_path, monkeypatch):
  real = ck.Checkpointer.restore

  def failing(self, step, abstract):  # step 16 does not read back as saved
    if step == 16:
      raise CheckpointError('simulated: does not match its digest')
    return real(self, step, abstract)
  monkeypatch.setattr(ck.Checkpointer, 'restore', failing)
  c = tiny_config(mnist_slice, num_steps=16, checkpoint_every=8, keep_checkpoints=1)
  train_and_evaluate(c, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps == [8, 16]  # keep=1, but 16 never verified: 8 stays


def test_digest_sees_any_changed_value():
  tree = {'a': np.arange(1000, dtype=np.float32), 'b': np.ones((3, 4), np.int32),
          'c': np.zeros(5, bool)}
  d0 = np.asarray(ck.state_digest(tree))
  for leaf, i, value in [('a', 500, 500.0001), ('b', (2, 3), 2), ('c', 4, True)]:
    t = {k: v.copy() for k, v in tree.items()}
    t[leaf][i] = value
    d = np.asarray(ck.state_digest(t))
    assert (d != d0).sum() == 1
  swapped = {**tree, 'a': tree['a'][::-1].copy()}  # same values, other places
  assert not np.array_equal(np.asarray(ck.state_digest(swapped)), d0)


def _digest_by_numpy(x: np.ndarray) -> int:
  """The documented digest of one leaf, transcribed in numpy: the sum mod
  2^32 over its words w_i (4-byte values' bits; 1-2-byte values widened;
  bools as 0/1) of lowbias32(w_i ^ lowbias32(i * 0x9E3779B1 + 1))."""
  def lowbias32(v):
    v = v.astype(np.uint64) & 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)
  x = np.asarray(x).reshape(-1)
  if x.dtype == bool:
    w = x.astype(np.uint64)
  else:
    w = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
  i = np.arange(w.size, dtype=np.uint64)
  return int(lowbias32(w ^ lowbias32(i * 0x9E3779B1 + 1)).sum() & 0xFFFFFFFF)


def test_digest_is_the_documented_hash_for_stacked_and_single_leaves():
  # Leaves of one length (hashed stacked), lengths of their own, and one
  # above the stacking bound (hashed alone); several dtypes.
  rng = np.random.default_rng(0)
  tree = {'k1': rng.standard_normal((3, 3, 4, 4)).astype(np.float32),
          'k2': rng.standard_normal((9, 16)).astype(np.float32),
          'b': rng.integers(-5, 5, (144,)).astype(np.int32),
          'h': rng.standard_normal(144).astype(ml_dtypes.bfloat16),
          'q': rng.integers(0, 255, (7,)).astype(np.uint8),
          'm': rng.random(144) < 0.5,
          'big': rng.standard_normal(pytrees.STACKED_ELEMENTS + 3).astype(np.float32),
          's': np.float32(2.5)}
  leaves = jax.tree.leaves(tree)
  got = [int(v) for v in np.asarray(ck.state_digest(tree))]
  assert got == [_digest_by_numpy(x) for x in leaves]


def test_divergence_stops_keeps_the_last_finite_checkpoint_and_exits_3(mnist_slice, tmp_path):
  # SGD whose warm-up drives the lr to 100 * step: the loss overflows at step ~31.
  over = {'optimizer.name': 'sgd', 'optimizer.lr': 1e6, 'optimizer.warmup_steps': 10_000,
          'optimizer.schedule': 'constant'}
  c = tiny_config(mnist_slice, num_steps=60, log_every=1, checkpoint_every=4, **over)
  with pytest.raises(DivergenceError, match=r'diverged.*step (\d+).*last checkpoint, step (\d+)'):
    train_and_evaluate(c, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps and steps[-1] < 60
  ts = restore(str(tmp_path)).train_state
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ts.state))
  export_run(str(tmp_path), str(tmp_path / 'ok.pemn'), params_dir=None)  # finite: exports
  # The CLI: a clear message and exit status 3; lr=inf is refused up front.
  args = ['--config', 'configs/quickstart.py', '--config.dataset=mnist',
          f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.batch_size=32',
          '--config.eval_batch_size=100', '--config.num_steps=40', '--config.log_every=1']
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args, '--config.optimizer.lr=1e9',
                      '--config.optimizer.name=sgd', f'--workdir={tmp_path / "cli"}'],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 3 and 'training diverged' in p.stderr, p.stderr[-2000:]
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args, '--config.optimizer.lr=inf',
                      f'--workdir={tmp_path / "cli2"}'], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2 and 'optimizer.lr' in p.stderr and 'finite' in p.stderr


def test_another_configs_checkpoints_are_refused_naming_the_keys(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, param=PEMN, num_steps=8, **{'optimizer.lr': 0.05})
  train_and_evaluate(c, str(tmp_path))
  stored = restore(str(tmp_path)).config.to_dict()
  for key, value, named in [('param', dict(PEMN, keep=0.3), 'param.keep'),
                            ('dataset', 'fashion_mnist', 'dataset'),
                            ('seed', 7, 'seed'), ('augment', 'flip', 'augment')]:
    d = tiny_config(mnist_slice, param=PEMN, num_steps=16, **{'optimizer.lr': 0.05})
    d[key] = value
    with pytest.raises(ConfigError, match=named.replace('.', r'\.') + ': checkpoint'):
      train_and_evaluate(d, str(tmp_path))
  # The stored config was not overwritten; allowed keys (length, cadence, lr) may change.
  assert restore(str(tmp_path)).config.to_dict() == stored
  d = tiny_config(mnist_slice, param=PEMN, num_steps=12, log_every=2, eval_every=6,
                  **{'optimizer.lr': 0.01})
  assert train_and_evaluate(d, str(tmp_path))['step'] == 12


def test_resume_below_the_checkpoint_and_renamed_steps_are_errors(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, num_steps=8)
  train_and_evaluate(c, str(tmp_path))
  c.num_steps = 4
  with pytest.raises(ConfigError, match='at step 8, beyond this run.s 4 steps'):
    train_and_evaluate(c, str(tmp_path))
  os.rename(tmp_path / 'checkpoints' / '8', tmp_path / 'checkpoints' / '12')
  c.num_steps = 16
  with pytest.raises(CheckpointError, match='directory 12 .* holds step 8'):
    train_and_evaluate(c, str(tmp_path))


def test_metrics_have_one_record_per_step_after_a_crash_and_resume(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, num_steps=12, checkpoint_every=8, log_every=2, eval_every=4)
  train_and_evaluate(c, str(tmp_path))
  # A crash after step 12's records but before its checkpoint: remove that checkpoint.
  import shutil
  shutil.rmtree(tmp_path / 'checkpoints' / '12')
  c.num_steps = 16
  train_and_evaluate(c, str(tmp_path))
  recs = metrics(tmp_path)
  for kind in ('loss', 'test_accuracy'):
    steps = [r['step'] for r in recs if kind in r]
    assert len(steps) == len(set(steps)) and steps == sorted(steps), (kind, steps)
  assert [r['step'] for r in recs if 'loss' in r] == [2, 4, 6, 8, 10, 12, 14, 16]


def _start(args, workdir):
  return subprocess.Popen([sys.executable, '-m', 'pemn_jax.main', *args, f'--workdir={workdir}'],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))


def test_a_second_run_in_a_locked_workdir_is_refused_and_a_dead_runs_lock_is_taken_over(
    mnist_slice, tmp_path):
  args = ['--config', 'configs/quickstart.py', '--config.dataset=mnist',
          f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.batch_size=32',
          '--config.eval_batch_size=100', '--config.log_every=1']
  first = _start([*args, '--config.num_steps=100000', '--config.checkpoint_every=100000'],
                 tmp_path)
  for line in first.stdout:
    if line.startswith('step 2/'):
      break
  t0 = time.time()
  second = subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args,
                           '--config.num_steps=100000', '--config.checkpoint_every=100000',
                           f'--workdir={tmp_path}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert second.returncode == 2 and 'in use by another run' in second.stderr
  assert f'pid {first.pid}' in second.stderr and time.time() - t0 < 120
  first.send_signal(signal.SIGKILL)  # dies holding the lock: no clean-up at all
  first.wait()
  third = subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args, '--config.num_steps=3',
                          f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert third.returncode == 0, third.stderr[-2000:]
  assert 'final: step 3' in third.stdout


@pytest.mark.parametrize('key,value,match', [
    ('seed', 2**40, 'seed'), ('seed', -1, 'seed'), ('optimizer.lr', float('inf'), 'finite'),
    ('optimizer.weight_decay', float('nan'), 'finite'), ('train_limit', 10, 'one batch'),
    ('augment', 'mixup', 'augment'), ('optimizer.decay_epochs', -1.0, 'decay_epochs'),
    ('prune.every', 0, 'prune.every'),
    ('augment_options.erase', 2.0, 'erase'),
])
def test_bad_config_values_are_named(key, value, match):
  c = base_config()
  a, _, b = key.partition('.')
  if b:
    c[a][b] = value
  else:
    c[a] = value
  with pytest.raises(ConfigError, match=match):
    validate(c)


def test_ring_dof_beyond_the_generated_weights_is_a_config_error(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, param={'name': 'ring', 'dof': 10**7})
  with pytest.raises(ConfigError, match='dof=10000000 exceeds'):
    train_and_evaluate(c, str(tmp_path))


def test_unusable_workdirs_are_clear_errors(mnist_slice, tmp_path):
  afile = tmp_path / 'file'
  afile.write_text('x')
  for wd, match in [(str(afile), 'not a directory|cannot create'),
                    (str(afile / 'sub'), 'cannot create'), ('', 'directory path')]:
    with pytest.raises(WorkdirError, match=match):
      train_and_evaluate(tiny_config(mnist_slice), wd)
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.main', '--config', 'configs/quickstart.py',
                      f'--workdir={afile}/sub'], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 2 and 'cannot create workdir' in p.stderr and 'Traceback' not in p.stderr


def test_stop_at_step_reports_where_it_stopped(mnist_slice, tmp_path):
  args = ['--config', 'configs/quickstart.py', '--config.dataset=mnist',
          f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.batch_size=32',
          '--config.eval_batch_size=100', '--config.num_steps=20', '--config.stop_at_step=6']
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args, f'--workdir={tmp_path}'],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and 'stopped at step 6' in p.stdout, p.stdout + p.stderr


def test_a_resumed_run_trains_at_its_new_learning_rate(mnist_slice, tmp_path):
  # The rate lives in the optimizer state (inject_hyperparams); a resume with a
  # lower config.optimizer.lr (to get past a divergence) must use the new one.
  c = tiny_config(mnist_slice, num_steps=8, stop_at_step=4, checkpoint_every=4)
  train_and_evaluate(c, str(tmp_path))
  at4 = restore(str(tmp_path)).train_state
  c = tiny_config(mnist_slice, num_steps=8, checkpoint_every=4, **{'optimizer.lr': 1e-30})
  train_and_evaluate(c, str(tmp_path))
  at8 = restore(str(tmp_path)).train_state
  assert int(at8.step) == 8
  # Adam's steps are ~lr in size: at 1e-30 no float32 weight moves.
  assert tree_equal(at4.state, at8.state)
  with open(tmp_path / 'metrics.jsonl') as f:
    lrs = [r['lr'] for r in map(json.loads, f) if 'lr' in r and r['step'] > 4]
  assert lrs and max(lrs) < 1e-29


def test_checkpoints_of_another_optimizer_layout_are_refused_for_training_but_export(
    mnist_slice, tmp_path):
  # Checkpoints written before 2026-11-24 hold the optimizer state without
  # inject_hyperparams' wrapper. Training cannot resume them (refused, naming
  # why, nothing touched); export and evaluation read their trained state.
  import optax

  from pemn_jax.train.checkpoint import Checkpointer
  from pemn_jax.train.run import Run
  c = tiny_config(mnist_slice, param=PEMN, num_steps=8, checkpoint_every=4, stop_at_step=4,
                  **{'optimizer.lr': 0.05})
  train_and_evaluate(c, str(tmp_path))
  ts = restore(str(tmp_path)).train_state
  ts = ts.replace(opt_state=optax.adamw(0.05).init(ts.state))  # the older layout
  shutil.rmtree(tmp_path / 'checkpoints')
  ck = Checkpointer(str(tmp_path), 3)
  ck.save(4, ts, Run.build(c).meta(c, 4, {}))
  ck.close()
  assert 'hyperparams' not in (tmp_path / 'checkpoints' / '4' / 'state' / '_METADATA').read_text()
  c.stop_at_step = None
  with pytest.raises(CheckpointError, match='(?s)another pemn_jax version.*export, evaluate and '
                     'evolve still read its trained state.*left untouched'):
    train_and_evaluate(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
  assert tree_equal(restore(str(tmp_path)).train_state.state, ts.state)
  assert export_run(str(tmp_path), str(tmp_path / 'old.pemn'))['file_bytes'] > 0


def test_a_train_state_larger_than_the_host_memory_is_refused_before_allocation(
    mnist_slice, tmp_path):
  # A dense 784-2,000,000-10 MLP: 1.59e9 parameters, 18 GiB of params and
  # AdamW moments; the process may map 6 GiB more than it has at start-up.
  code = '\n'.join([
      'import resource, runpy, sys',
      'with open("/proc/self/status") as f:',
      '  vm = next(int(ln.split()[1]) << 10 for ln in f if ln.startswith("VmSize:"))',
      'resource.setrlimit(resource.RLIMIT_AS, (vm + (6 << 30), resource.RLIM_INFINITY))',
      'sys.argv = ["pemn_jax.main", *sys.argv[1:]]',
      'runpy.run_module("pemn_jax.main", run_name="__main__")'])
  args = ['--config', 'configs/quickstart.py:dense=true', '--config.dataset=mnist',
          f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.batch_size=32',
          '--config.model_kwargs.hidden=(2000000,)', '--config.num_steps=2',
          f'--workdir={tmp_path}']
  p = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  assert 'the train state needs 18,' in p.stderr and 'more than this host has available' in \
      p.stderr and 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'checkpoints') or not os.listdir(tmp_path / 'checkpoints')


def test_a_train_step_larger_than_the_host_memory_is_refused_naming_the_batch_size(
    mnist_slice, tmp_path):
  # ResNet-8 of width 256 on 512 MNIST images a step: 19.6M parameters, a
  # state of ~150 MiB with its momentum, but ~6 GiB of activations and
  # gradients (width 128: 3,033 MiB by XLA's memory analysis); the process
  # may map 3 GiB more than it has at start-up.
  code = '\n'.join([
      'import resource, runpy, sys',
      'with open("/proc/self/status") as f:',
      '  vm = next(int(ln.split()[1]) << 10 for ln in f if ln.startswith("VmSize:"))',
      'resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))',
      'sys.argv = ["pemn_jax.main", *sys.argv[1:]]',
      'runpy.run_module("pemn_jax.main", run_name="__main__")'])
  args = ['--config', 'configs/dense.py:model=resnet8,dataset=mnist',
          "--config.model_kwargs={'width': 256}",
          f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.batch_size=512',
          '--config.num_steps=2', '--config.eval_every=0', f'--workdir={tmp_path}']
  p = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, capture_output=True,
                     text=True, timeout=300, env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'))
  assert p.returncode == 2, p.stderr[-3000:]
  err = p.stderr.strip().splitlines()
  assert len(err) == 1 and 'a train step at config.batch_size=512 needs' in err[0] and \
      'more than this host has available' in err[0], p.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'checkpoints') or not os.listdir(tmp_path / 'checkpoints')


def test_the_memory_check_compiles_the_train_step_the_loop_runs(mnist_slice, tmp_path, caplog):
  # The check compiles the step for the first batch; the loop's calls reuse it.
  with jax.log_compiles(True), caplog.at_level('WARNING'):
    train_and_evaluate(tiny_config(mnist_slice, num_steps=4), str(tmp_path))
  compiled = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Finished XLA compilation of jit(train)')]
  assert len(compiled) == 1, compiled


def test_running_out_of_memory_is_one_line_and_exit_2(capsys):
  from jax.errors import JaxRuntimeError

  from pemn_jax.cli import exit_statuses
  with pytest.raises(SystemExit) as e, exit_statuses():
    raise JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 25408000064 bytes.')
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1
  assert err.startswith('error: out of memory (RESOURCE_EXHAUSTED') and 'batch' in err
  with pytest.raises(JaxRuntimeError), exit_statuses():  # other runtime errors stay errors
    raise JaxRuntimeError('INTERNAL: something else')


def test_all_finite_checks_host_arrays_where_they_are():

  from pemn_jax import pytrees
  before = pytrees._all_finite._cache_size()  # noqa: SLF001
  assert not pytrees.all_finite({'w': np.array([1, np.inf], ml_dtypes.bfloat16),
                                 'n': np.arange(3)})
  assert pytrees.all_finite({'w': np.ones(3, np.float32), 'n': np.array([7])})
  assert pytrees._all_finite._cache_size() == before  # noqa: SLF001 - nothing compiled
  assert not pytrees.all_finite({'w': jax.numpy.array([1.0, np.nan])})  # device arrays too


def test_all_finite_finds_one_bad_value_in_any_leaf_on_device():
  rng = np.random.default_rng(1)
  tree = {f'w{i}': rng.standard_normal((8, 8)).astype(np.float32) for i in range(5)}
  tree['h'] = rng.standard_normal(64).astype(ml_dtypes.bfloat16)  # same size, other dtype
  tree['big'] = rng.standard_normal(pytrees.STACKED_ELEMENTS + 1).astype(np.float32)  # alone
  tree['n'] = np.arange(64, dtype=np.int32)  # not a float: not checked
  assert pytrees.all_finite(jax.tree.map(jax.numpy.asarray, tree))
  last = pytrees.STACKED_ELEMENTS
  for leaf, where, bad in [('w3', (5, 2), np.inf), ('h', 63, np.nan), ('big', last, -np.inf)]:
    t = {k: v.copy() for k, v in tree.items()}
    t[leaf][where] = bad
    assert not pytrees.all_finite(jax.tree.map(jax.numpy.asarray, t)), leaf

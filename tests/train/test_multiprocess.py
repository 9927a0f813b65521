"""Multi-process training on JAX's own runtime (jax.distributed over gloo on
CPU, started by launch/local.sh): processes x devices agree with one process,
FSDP agrees with replication, checkpoints restore across meshes and process
counts, a killed process leaves a loadable checkpoint and no hang, and a save
that fails in every process ends each with exit 2."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, read_only_bind

METHODS = {'dense': 'configs/dense.py', 'rpg': 'configs/rpg.py', 'pemn': 'configs/pemn.py'}
FSDP = ['--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.sharding.state=fsdp',
        '--config.sharding.params=fsdp']


def args_for(mnist_slice, config, workdir, *extra):
  return [f'--config={config}:model=mlp,dataset=mnist', f'--workdir={workdir}',
          f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.batch_size=32',
          '--config.eval_batch_size=40', '--config.log_every=1', *extra]


def launch(args, processes=1, devices=1, env=None, wait=True):
  """``python -m pemn_jax.main`` (1 process) or ``launch/local.sh`` (several)."""
  e = dict(os.environ, PYTHONUNBUFFERED='1', PYTHON=sys.executable, DEVICES=str(devices),
           JAX_NUM_CPU_DEVICES=str(devices), XLA_FLAGS='', **(env or {}))
  cmd = ([sys.executable, '-m', 'pemn_jax.main', *args] if processes == 1
         else ['bash', 'launch/local.sh', str(processes), *args])
  p = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, start_new_session=True)
  if not wait:
    return p
  try:
    out, _ = p.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    raise
  return p.returncode, out


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(ln)['loss'] for ln in f if '"loss"' in ln]


@pytest.fixture(scope='module')
def prepared(mnist_slice):
  """The dataset prepared once (processes would otherwise race to build it)."""
  from pemn_jax.data import sources
  sources.load('mnist', 'train', mnist_slice['data_dir'], mnist_slice['source_dir'])
  sources.load('mnist', 'test', mnist_slice['data_dir'], mnist_slice['source_dir'])
  return mnist_slice


@pytest.mark.parametrize('method', list(METHODS))
def test_two_processes_of_two_devices_match_one_process_of_four(method, prepared, tmp_path):
  runs = {}
  for procs, devs in ((1, 4), (2, 2)):
    wd = tmp_path / f'{procs}x{devs}'
    rc, out = launch(args_for(prepared, METHODS[method], wd, '--config.num_steps=6',
                              '--config.sharding.generate=sharded'), procs, devs)
    assert rc == 0, out
    assert f'devices=4 processes={procs}' in out and 'generation sharded' in out
    runs[procs] = losses(wd)
  assert len(runs[1]) == 6
  np.testing.assert_allclose(runs[2], runs[1], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('method', ['dense', 'pemn'])
def test_fsdp_training_matches_replicated(method, prepared, tmp_path):
  runs = {}
  for name, extra in (('replicated', ['--config.sharding.generate=replicated']), ('fsdp', FSDP)):
    wd = tmp_path / name
    rc, out = launch(args_for(prepared, METHODS[method], wd, '--config.num_steps=6', *extra),
                     devices=4)
    assert rc == 0, out
    runs[name] = losses(wd)
  np.testing.assert_allclose(runs['fsdp'], runs['replicated'], rtol=2e-4, atol=2e-5)


def test_checkpoints_restore_across_meshes_and_process_counts(prepared, tmp_path):
  """Stopped at step 4 on one layout, resumed on another: the same losses
  as a run that never stopped (4 FSDP devices -> 2 replicated devices;
  2 processes -> 1 process)."""
  base = ['--config.num_steps=8']
  rc, out = launch(args_for(prepared, METHODS['pemn'], tmp_path / 'straight', *base))
  assert rc == 0, out
  straight = losses(tmp_path / 'straight')
  cases = {'fsdp4_to_replicated2': ((1, 4, FSDP), (1, 2, [])),
           'two_processes_to_one': ((2, 1, []), (1, 1, []))}
  for name, ((p1, d1, x1), (p2, d2, x2)) in cases.items():
    wd = tmp_path / name
    rc, out = launch(args_for(prepared, METHODS['pemn'], wd, *base, '--config.stop_at_step=4',
                              *x1), p1, d1)
    assert rc == 0 and 'stopped at step 4' in out, out
    rc, out = launch(args_for(prepared, METHODS['pemn'], wd, *base, *x2), p2, d2)
    assert rc == 0, out
    assert 'resumed from step 4' in out, out
    np.testing.assert_allclose(losses(wd), straight, rtol=2e-4, atol=2e-5, err_msg=name)


def _tree_digest(path):
  out = {}
  for d, _, files in sorted(os.walk(path)):
    for f in sorted(files):
      with open(os.path.join(d, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(d, f), path)] = hash(fh.read())
  return out


def test_restore_onto_a_mesh_that_cannot_hold_the_state_says_so(prepared, tmp_path,
                                                                    monkeypatch):
  wd = tmp_path / 'run'
  rc, out = launch(args_for(prepared, METHODS['dense'], wd, '--config.num_steps=8',
                            '--config.stop_at_step=4'), devices=1)
  assert rc == 0, out
  before = _tree_digest(wd / 'checkpoints')
  # A rule that splits the 300-wide kernel over 8 devices cannot hold it.
  rules = "[('state/Dense_0/kernel',(None,'data'))]"
  rc, out = launch(args_for(prepared, METHODS['dense'], wd, '--config.num_steps=8',
                            f'--config.sharding.state={rules}'), devices=8)
  assert rc == 2, out
  assert 'state/Dense_0/kernel of shape (784, 300) cannot be split' in out
  assert 'not divisible by 8' in out
  assert _tree_digest(wd / 'checkpoints') == before
  # Devices too small for the state (as an accelerator's memory_stats would
  # say): a clear error before anything is restored.
  from conftest import load_config

  from pemn_jax.config import ConfigError
  from pemn_jax.train import loop
  monkeypatch.setattr(loop, 'device_memory_limit', lambda: 1000)
  c = load_config('dense', 'model=mlp,dataset=mnist')
  c.source_dir, c.data_dir = prepared['source_dir'], prepared['data_dir']
  c.batch_size, c.num_steps = 32, 8
  with pytest.raises(ConfigError, match=r'needs 3\.1 MiB per device .* a device holds 0\.0 '
                                        r'MiB: use more devices'):
    loop.train_and_evaluate(c, str(wd))
  assert _tree_digest(wd / 'checkpoints') == before


def test_a_killed_process_leaves_a_loadable_checkpoint_and_no_hang(prepared, tmp_path):
  wd = tmp_path / 'run'
  args = args_for(prepared, 'configs/quickstart.py', wd, '--config.dataset=mnist',
                  '--config.num_steps=100000', '--config.checkpoint_every=4',
                  '--heartbeat_timeout=5')
  args[0] = '--config=configs/quickstart.py'
  p = launch(args, processes=2, wait=False)
  ckdir = wd / 'checkpoints'
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (ckdir.is_dir() and any(
        n.isdigit() and int(n) >= 8 for n in os.listdir(ckdir))):
      time.sleep(0.5)
    assert time.time() < deadline, 'no checkpoint appeared'
    victim = subprocess.run(['pgrep', '-f', f'process_id 1 .*{wd}'], capture_output=True,
                            text=True).stdout.split()
    assert len(victim) == 1, victim
    os.kill(int(victim[0]), signal.SIGKILL)
    killed_at = time.time()
    out, _ = p.communicate(timeout=120)  # the survivor must not wait forever
  except BaseException:
    os.killpg(p.pid, signal.SIGKILL)
    raise
  waited = time.time() - killed_at
  assert p.returncode != 0
  # Either the next collective failed (our message, exit 4) or JAX's
  # coordination service saw the missing heartbeats and terminated it.
  assert ('lost contact with another process' in out
          or 'another task died' in out), out[-3000:]
  assert waited < 60, waited
  from pemn_jax.train.run import restore
  r = restore(str(wd))
  ts = r.train_state
  assert int(ts.step) >= 8 and int(ts.step) % 4 == 0
  # ... and the run resumes from it in one process.
  rc, out = launch([*args[:-1], f'--config.num_steps={int(ts.step) + 2}'])
  assert rc == 0, out
  assert f'resumed from step {int(ts.step)}' in out


def test_eval_batch_not_divisible_by_devices_is_padded_and_train_batch_is_an_error(
    prepared, tmp_path):
  """An eval batch of 45 on 2 devices evaluates all 100 test examples as on one
  device; a train batch of 33 on 2 devices is an error naming the sizes."""
  acc = {}
  for devs in (1, 2):
    wd = tmp_path / f'eval{devs}'
    rc, out = launch(args_for(prepared, 'configs/dense.py', wd, '--config.num_steps=2',
                              '--config.eval_batch_size=45', '--config.test_limit=100',
                              '--config.eval_every=2'), 1, devs)
    assert rc == 0, out
    with open(wd / 'metrics.jsonl') as f:
      rec = [json.loads(ln) for ln in f if '"test_accuracy"' in ln][-1]
    acc[devs] = (rec['test_accuracy'], rec['test_loss'])
  np.testing.assert_allclose(acc[2], acc[1], rtol=1e-5)
  rc, out = launch(args_for(prepared, 'configs/dense.py', tmp_path / 'bad', '--config.num_steps=2',
                            '--config.batch_size=33'), 1, 2)
  assert rc == 2 and 'config.batch_size=33 is not divisible by the 2 devices' in out, out


def test_a_save_failing_in_every_process_exits_2_in_each_without_a_hang(prepared, tmp_path):
  # The checkpoint directory turns read-only under a 2-process job (a bind
  # mount, root only): each process's save fails, and each must end with the
  # filesystem message and exit 2 -- not wait on the other in a collective
  # -- keeping the earlier checkpoint.
  wd = tmp_path / 'run'
  args = args_for(prepared, 'configs/quickstart.py', wd, '--config.dataset=mnist',
                  '--config.num_steps=40', '--config.checkpoint_every=4')
  args[0] = '--config=configs/quickstart.py'
  rc, out = launch([*args, '--config.stop_at_step=4'], processes=2)
  assert rc == 0, out[-3000:]
  ck = str(wd / 'checkpoints')
  with read_only_bind(ck) as real:
    if not real:
      pytest.skip('needs root and a permitted mount (a read-only bind mount)')
    t0 = time.time()
    rc, out = launch(args, processes=2)
    waited = time.time() - t0
  assert rc == 2, out[-3000:]
  assert out.count('not writable') >= 2 and 'Traceback' not in out, out[-3000:]
  assert waited < 120, waited
  assert sorted(int(n) for n in os.listdir(ck) if n.isdigit()) == [4]

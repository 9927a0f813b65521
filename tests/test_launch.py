"""Cluster launchers (their --dry-run output) and multi-process start-up
decisions (pemn_jax/train/multihost.py)."""

import os
import shlex
import subprocess

import pytest
from conftest import REPO

from pemn_jax.train import multihost as M

ARGS = ['--config', 'configs/pemn.py:model=resnet18,dataset=cifar10', '--workdir', '/shared/r 1']


def dry_run(script, env, *args):
  e = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM', 'TPU_', 'OMPI'))}
  r = subprocess.run(['bash', f'launch/{script}', '--dry-run', *args], cwd=REPO,
                     env={**e, **env}, capture_output=True, text=True, timeout=60)
  return r.returncode, r.stdout, r.stderr


def test_slurm_one_process_per_node():
  rc, out, err = dry_run('slurm.sh', {'NODES': '4', 'GPUS_PER_NODE': '8', 'PARTITION': 'a100',
                                      'TIME': '2:00:00'}, *ARGS)
  assert rc == 0, err
  lines = out.splitlines()
  for want in ['#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
               '#SBATCH --partition=a100', '#SBATCH --time=2:00:00', '#SBATCH --signal=TERM@120']:
    assert want in lines, out
  assert not any('--account' in ln for ln in lines)
  srun = [ln for ln in lines if ln.startswith('srun ')]
  assert len(srun) == 1
  words = shlex.split(srun[0])
  assert words[words.index('-m') + 1] == 'pemn_jax.main'
  assert words[-5:] == [*ARGS, '--local_device_ids=all']  # the quoting survives
  assert '--kill-on-bad-exit=1' in words


def test_slurm_one_process_per_gpu_and_bad_variables():
  rc, out, _ = dry_run('slurm.sh', {'GPUS_PER_NODE': '4', 'PER': 'gpu'}, *ARGS)
  assert rc == 0 and '#SBATCH --ntasks-per-node=4' in out
  assert '--local_device_ids' not in out
  rc, _, err = dry_run('slurm.sh', {'PER': 'socket'}, *ARGS)
  assert rc == 2 and 'PER must be node or gpu' in err
  rc, _, err = dry_run('slurm.sh', {})
  assert rc == 2 and 'usage' in err


def test_tpu_vm_runs_the_same_command_on_every_worker():
  rc, out, err = dry_run('tpu_vm.sh', {'TPU_NAME': 'pod', 'ZONE': 'us-east5-a',
                                       'BUCKET': 'bkt'}, *ARGS)
  assert rc == 0, err
  cmd = shlex.split(out.splitlines()[-1])
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
  assert '--worker=all' in cmd and cmd[cmd.index('--zone') + 1] == 'us-east5-a'
  remote = cmd[cmd.index('--command') + 1]
  assert 'gcsfuse --implicit-dirs bkt /gcs/bkt' in remote
  tail = shlex.split(remote.rsplit('python3 -m pemn_jax.main', 1)[1])
  assert tail == ['--distributed', *ARGS, '--config.data_dir=/gcs/bkt/tensorflow_datasets']
  rc, _, err = dry_run('tpu_vm.sh', {'ZONE': 'z', 'BUCKET': 'b'}, *ARGS)
  assert rc != 0 and 'TPU_NAME' in err


def test_xpk_workload():
  rc, out, err = dry_run('xpk.sh', {'CLUSTER': 'gke1', 'TPU_TYPE': 'tpu7x-4x4x4',
                                    'NUM_SLICES': '2', 'WORKLOAD': 'pemn-test'}, *ARGS)
  assert rc == 0, err
  cmd = shlex.split(out.splitlines()[-1])
  assert cmd[:3] == ['xpk', 'workload', 'create']
  for flag, value in [('--cluster', 'gke1'), ('--tpu-type', 'tpu7x-4x4x4'), ('--num-slices', '2'),
                      ('--workload', 'pemn-test'), ('--script-dir', str(REPO))]:
    assert cmd[cmd.index(flag) + 1] == value
  inner = cmd[cmd.index('--command') + 1]
  assert shlex.split(inner.rsplit('pemn_jax.main', 1)[1]) == [
      *ARGS, '--config.data_dir=/gcs/data/tensorflow_datasets']
  rc, _, err = dry_run('xpk.sh', {}, *ARGS)
  assert rc != 0 and 'CLUSTER' in err


def test_local_launcher_dry_run_lists_every_process():
  rc, out, err = dry_run('local.sh', {'DEVICES': '2', 'PORT': '23456'}, '3', *ARGS)
  assert rc == 0, err
  lines = [shlex.split(ln) for ln in out.splitlines()]
  assert len(lines) == 3
  for i, words in enumerate(lines):
    assert 'JAX_NUM_CPU_DEVICES=2' in words
    assert words[words.index('--process_id') + 1] == str(i)
    assert words[words.index('--coordinator') + 1] == '127.0.0.1:23456'
    assert words[-4:] == ARGS


def test_detection_of_multi_process_environments():
  assert M.detect({}) is None
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '2'}
  assert M.detect(slurm) == 'slurm'
  assert M.detect({**slurm, 'SLURM_NTASKS': '1'}) is None          # one task: single process
  assert M.detect({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2'}) is None  # the batch script, not srun
  assert M.detect({'OMPI_COMM_WORLD_SIZE': '4'}) == 'ompi'
  assert M.detect({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}) == 'tpu'
  assert M.detect({'TPU_WORKER_HOSTNAMES': 'h0'}) is None


def test_plans_for_flags_and_environments():
  assert M.plan(environ={}) is None
  assert M.plan(distributed=False, environ={'OMPI_COMM_WORLD_SIZE': '4'}) is None
  assert M.plan(environ={'OMPI_COMM_WORLD_SIZE': '4'}) == {'source': 'ompi'}
  assert M.plan(distributed=True, environ={}) == {'source': 'jax cluster detection'}
  assert M.plan('10.0.0.1:1234', 2, 1, environ={}) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1,
      'source': 'flags'}
  slurm = {'SLURM_STEP_NODELIST': 'n1,n2', 'SLURM_NTASKS': '2', 'SLURM_GPUS_ON_NODE': '8'}
  assert M.plan(local_device_ids='all', environ=slurm)['local_device_ids'] == list(range(8))
  with_cuda = {**slurm, 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  assert M.plan(local_device_ids='all', environ=with_cuda)['local_device_ids'] == [0, 1, 2, 3]
  assert M.plan(local_device_ids='2,3', environ=slurm)['local_device_ids'] == [2, 3]
  for kwargs, msg in [({'coordinator': 'h:1'}, 'go together'),
                      ({'coordinator': 'h:1', 'num_processes': 2, 'process_id': 2}, r'\[0, 2\)'),
                      ({'coordinator': 'h', 'num_processes': 2, 'process_id': 0}, 'HOST:PORT'),
                      ({'coordinator': 'h:1', 'num_processes': 2, 'process_id': 0,
                        'distributed': False}, 'contradicts'),
                      ({'distributed': True, 'local_device_ids': 'all'}, 'cannot tell how many'),
                      ({'distributed': True, 'local_device_ids': '0,x'}, 'comma-separated'),
                      ({'distributed': True, 'local_device_ids': '1,1'}, 'distinct')]:
    with pytest.raises(M.LaunchError, match=msg):
      M.plan(environ={}, **kwargs)


def test_bad_launch_flags_exit_2_with_the_reason(tmp_path):
  import sys
  r = subprocess.run([sys.executable, '-m', 'pemn_jax.main', '--config', 'configs/quickstart.py',
                      '--workdir', str(tmp_path), '--coordinator', '127.0.0.1:1'],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert '--coordinator, --num_processes and --process_id go together' in r.stderr


def _tiny_args(mnist_slice, workdir):
  return ['--config', 'configs/quickstart.py', '--workdir', str(workdir),
          '--config.dataset=mnist', f'--config.source_dir={mnist_slice["source_dir"]}',
          '--config.num_steps=2', '--config.batch_size=16', '--config.train_limit=64',
          '--config.test_limit=50', '--config.eval_batch_size=50', '--config.eval_every=0',
          '--config.log_every=1']


# What each launcher's target announces: a one-task SLURM step stands in for
# the TPU VM's cluster (--distributed must find one to initialize from).
ONE_TASK = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'localhost', 'SLURM_NTASKS': '1',
            'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'SLURM_GPUS_ON_NODE': '1'}


@pytest.mark.parametrize('script', ['slurm.sh', 'tpu_vm.sh', 'xpk.sh'])
def test_the_command_each_launcher_runs_trains_locally(script, mnist_slice, tmp_path):
  """The exact python command a launcher would run on its target, run here
  (tiny size): absl must accept its flags in the order the launcher puts them."""
  import sys
  args = _tiny_args(mnist_slice, tmp_path / 'run')
  env = {'TPU_NAME': 'pod', 'ZONE': 'z', 'BUCKET': 'b', 'CLUSTER': 'c',
         'DATA_DIR': mnist_slice['data_dir'], 'PYTHON': 'python3'}
  if script == 'slurm.sh':
    args.append(f'--config.data_dir={mnist_slice["data_dir"]}')
  rc, out, err = dry_run(script, env, *args)
  assert rc == 0, err
  last = out.splitlines()[-1]
  if script == 'slurm.sh':
    line = shlex.split(last)[2:]  # after 'srun --kill-on-bad-exit=1'
  else:
    cmd = shlex.split(last)
    line = shlex.split(cmd[cmd.index('--command') + 1].split('; ')[-1].split('&& ')[-1])
  assert line[:3] == ['python3', '-m', 'pemn_jax.main'], line
  assert sum(w.startswith('--config.data_dir') for w in line) == 1, line
  e = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM', 'TPU_', 'OMPI'))}
  r = subprocess.run([sys.executable, *line[1:]], cwd=REPO, env={**e, **ONE_TASK},
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / 'run' / 'metrics.jsonl').exists()


def test_a_data_dir_the_user_sets_is_not_overridden():
  for script in ('tpu_vm.sh', 'xpk.sh'):
    rc, out, err = dry_run(script, {'TPU_NAME': 'p', 'ZONE': 'z', 'BUCKET': 'b', 'CLUSTER': 'c'},
                           *ARGS, '--config.data_dir=/mine')
    assert rc == 0, err
    assert '--config.data_dir=/mine' in out and 'tensorflow_datasets' not in out.split('\n')[-2]

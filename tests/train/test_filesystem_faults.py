"""Filesystem faults are clear errors, never tracebacks or hangs, and lose
nothing: a full disk while training and while exporting, a read-only
checkpoint directory, workdir entries of the wrong type, temporary
directories a killed save left, a corrupt newest step under export.

A full disk is a small tmpfs where the tests run as root (the real kernel
error, through orbax's background writer); elsewhere the writer's error is
injected.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, mounted, read_only_bind, tiny_config

from pemn_jax.train.loop import train_and_evaluate
from pemn_jax.train.workdir import WorkdirError


def _cli_args(mnist_slice, steps):
  return ['--config', 'configs/quickstart.py', '--config.dataset=mnist',
          f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.model_kwargs.hidden=(32,)',
          '--config.batch_size=32', '--config.eval_batch_size=100', '--config.log_every=4',
          '--config.checkpoint_every=4', f'--config.num_steps={steps}']


def _main(args, workdir, timeout=120, env=None):
  return subprocess.run([sys.executable, '-m', 'pemn_jax.main', *args, f'--workdir={workdir}'],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _temps(workdir):
  return [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]


_NO_SPACE = """
import errno, os
_statvfs, _replace = os.statvfs, os.replace
os.statvfs = lambda p: os.statvfs_result((*_statvfs(p)[:4], 0, *_statvfs(p)[5:]))
def _full(src, dst, *a, **k):
  if str(dst).endswith('.pemn'):
    raise OSError(errno.ENOSPC, 'No space left on device', str(src))
  return _replace(src, dst, *a, **k)
os.replace = _full
"""


def test_a_full_disk_stops_training_and_export_with_exit_2_and_the_rerun_resumes(
    mnist_slice, tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  with mounted(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(disk)], str(disk)) as real:
    wd = str(disk / 'run')
    args = _cli_args(mnist_slice, 16)
    first = _main(args + ['--config.stop_at_step=4'], wd)
    assert first.returncode == 0, first.stderr[-2000:]
    os.makedirs(os.path.join(wd, 'checkpoints', '99.orbax-checkpoint-tmp'))  # a killed save's
    filler, env = disk / 'filler', None
    if real:  # fill the disk but for 64 KiB (the lock and log writes fit, a step does not)
      with open(filler, 'wb', buffering=0) as f, contextlib.suppress(OSError):
        while True:
          f.write(b'\0' * 65536)
      with open(filler, 'r+b') as f:
        f.truncate(os.path.getsize(filler) - (64 << 10))
    else:  # no tmpfs here: the OS is made to report a full disk (statvfs, the file write)
      (tmp_path / 'inject').mkdir()
      (tmp_path / 'inject' / 'sitecustomize.py').write_text(_NO_SPACE)
      env = dict(os.environ, PYTHONPATH=str(tmp_path / 'inject'))
    failed = _main(args, wd, env=env)
    assert failed.returncode == 2, failed.stderr[-2000:]
    err = failed.stderr
    assert 'No space left on device' in err and 'steps 4' in err and 'Traceback' not in err
    assert _steps(wd) == [4] and not _temps(wd)  # the earlier step kept, no partial one left

    # export onto the full disk: exit 2, nothing under the final name, no temp file
    p = subprocess.run([sys.executable, '-m', 'pemn_jax.export', f'--workdir={wd}',
                        f'--out={disk / "m.pemn"}'], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 2 and 'No space left' in p.stderr, p.stderr[-2000:]
    assert not [n for n in os.listdir(disk) if n.startswith('m.pemn')]

    if real:  # a save that fails in orbax's background writer (no step to size it by)
      with open(filler, 'r+b') as f:
        f.truncate(os.path.getsize(filler) - (64 << 10))
      # (it used to hang on orbax's threads; then it ran on to the next save, step 400)
      fresh = _main([*args, '--config.num_steps=1000', '--config.checkpoint_every=200',
                     '--config.log_every=20'], str(disk / 'fresh'))
      assert fresh.returncode == 2 and 'No space left on device' in fresh.stderr, \
          fresh.stderr[-2000:]
      assert not _temps(str(disk / 'fresh'))
      with open(disk / 'fresh' / 'metrics.jsonl') as f:  # stopped soon after the failed save
        assert 200 <= max(json.loads(ln)['step'] for ln in f) < 400
      shutil.rmtree(disk / 'fresh')
      filler.unlink()
    again = _main(args, wd)
    assert again.returncode == 0 and 'resumed from step 4' in again.stdout, again.stderr[-2000:]
    assert _steps(wd)[-1] == 16


def test_a_read_only_checkpoint_directory_exits_2_within_seconds(mnist_slice, tmp_path):
  wd = str(tmp_path / 'run')
  args = _cli_args(mnist_slice, 16)
  assert _main(args + ['--config.stop_at_step=4'], wd).returncode == 0
  ck = os.path.join(wd, 'checkpoints')
  with read_only_bind(ck) as real:
    if not real:
      os.chmod(ck, 0o555)
    try:
      p = _main(args, wd, timeout=90)  # (it used to hang on orbax's threads until killed)
    finally:
      os.chmod(ck, 0o755) if not real else None
  assert p.returncode == 2, p.stderr[-2000:]
  assert 'not writable' in p.stderr and 'steps 4' in p.stderr and 'Traceback' not in p.stderr
  assert _steps(wd) == [4]


@pytest.mark.parametrize('entry,make', [('checkpoints', 'file'), ('checkpoints/rejected', 'file'),
                                        ('metrics.jsonl', 'dir'), ('lock', 'dir')])
def test_workdir_entries_of_the_wrong_type_are_named(mnist_slice, tmp_path, entry, make):
  wd = tmp_path / 'run'
  (wd / os.path.dirname(entry)).mkdir(parents=True, exist_ok=True)
  if make == 'file':
    (wd / entry).write_text('x')
  else:
    (wd / entry).mkdir()
  with pytest.raises(WorkdirError, match=entry):
    train_and_evaluate(tiny_config(mnist_slice, num_steps=4), str(wd))


def test_export_and_the_search_use_the_newest_good_step(mnist_slice, tmp_path):
  from pemn_jax.export.model_file import export_run
  wd = str(tmp_path / 'run')
  train_and_evaluate(tiny_config(mnist_slice, num_steps=16, checkpoint_every=8), wd)
  meta = os.path.join(wd, 'checkpoints', '16', 'meta', 'metadata')
  m = json.load(open(meta))
  m['best'] = {'test_accuracy': 1.0}  # its digest no longer matches
  json.dump(m, open(meta, 'w'))
  said = []
  out = export_run(wd, str(tmp_path / 'm.pemn'), say=said.append)
  assert out['header']['step'] == 8
  assert any('using step 8' in s and 'step 16' in s for s in said), said
  assert _steps(wd) == [8, 16]  # a reader moves nothing

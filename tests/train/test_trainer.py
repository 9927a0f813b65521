"""End-to-end training on a small real MNIST slice: every method, resume,
SIGTERM, 8 devices vs 1, and bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, saved_train_state, tiny_config, tree_equal

from pemn_jax.config import ConfigError, base_config, validate
from pemn_jax.data.sources import DataError
from pemn_jax.train.checkpoint import CheckpointError
from pemn_jax.train.loop import train_and_evaluate
from pemn_jax.train.run import restore

METHODS = {
    'dense': {'name': 'dense'},
    'pemn_rp': {'name': 'masked', 'keep': 0.5,
                'source': {'name': 'prototype', 'mode': 'rp', 'ratio': 1e-2}},
    'pemn_ol': {'name': 'masked', 'keep': 0.5, 'source': {'name': 'prototype', 'mode': 'ol'}},
    'edge_popup': {'name': 'masked', 'keep': 0.5,
                   'source': {'name': 'prototype', 'mode': 'dense', 'rest': 'fixed'}},
    'supermask': {'name': 'masked', 'kind': 'supermask',
                  'source': {'name': 'prototype', 'mode': 'dense', 'rest': 'fixed'}},
    'rpg': {'name': 'ring', 'dof': 0.05},
}


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize('method', list(METHODS))
def test_each_method_trains_end_to_end(method, mnist_slice, tmp_path):
  lr = 3e-3 if method in ('dense', 'rpg') else 0.05
  c = tiny_config(mnist_slice, param=METHODS[method], **{'optimizer.lr': lr})
  out = train_and_evaluate(c, str(tmp_path))
  assert out['step'] == 24 and not out['stopped']
  recs = [r for r in read_metrics(tmp_path) if 'loss' in r]
  assert [r['step'] for r in recs] == [4, 8, 12, 16, 20, 24]
  assert recs[-1]['loss'] < recs[0]['loss']
  assert 0.2 < out['test_accuracy'] <= 1.0  # well above chance after 24 small steps
  assert out['model_bytes'] > 0 and out['dense_bytes'] == 4 * out['num_params']
  assert os.path.isdir(tmp_path / 'checkpoints' / '24')


def test_resume_gives_identical_params(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, param=METHODS['pemn_rp'], **{'optimizer.lr': 0.05})
  train_and_evaluate(c, str(tmp_path / 'a'))
  straight = restore(str(tmp_path / 'a')).train_state
  c.stop_at_step = 12
  first = train_and_evaluate(c, str(tmp_path / 'b'))
  assert first['stopped'] and first['step'] == 12
  c.stop_at_step = None
  train_and_evaluate(c, str(tmp_path / 'b'))
  resumed = restore(str(tmp_path / 'b')).train_state
  assert tree_equal(straight.state, resumed.state)
  assert tree_equal(saved_train_state(tmp_path / 'a')['opt_state'],
                    saved_train_state(tmp_path / 'b')['opt_state'])
  assert int(resumed.step) == 24


def test_prefetch_depth_changes_nothing_and_may_change_on_resume(mnist_slice, tmp_path):
  # supermask: the one method whose steps draw from the per-step key
  c = tiny_config(mnist_slice, param=METHODS['supermask'], prefetch=0, **{'optimizer.lr': 0.05})
  train_and_evaluate(c, str(tmp_path / 'inline'))
  inline = restore(str(tmp_path / 'inline')).train_state
  c.prefetch, c.stop_at_step = 2, 12
  assert train_and_evaluate(c, str(tmp_path / 'ahead'))['step'] == 12
  c.prefetch, c.stop_at_step = 5, None
  train_and_evaluate(c, str(tmp_path / 'ahead'))
  ahead = restore(str(tmp_path / 'ahead')).train_state
  assert int(ahead.step) == 24
  assert tree_equal(inline.state, ahead.state)
  assert tree_equal(saved_train_state(tmp_path / 'inline')['opt_state'],
                    saved_train_state(tmp_path / 'ahead')['opt_state'])
  losses = lambda wd: [r['loss'] for r in read_metrics(wd) if 'loss' in r]  # noqa: E731
  assert losses(tmp_path / 'inline') == losses(tmp_path / 'ahead')


def test_best_and_final_accuracy_are_reported_and_survive_resume(mnist_slice, tmp_path):
  sm = {'name': 'masked', 'kind': 'supermask', 'eval': 'expected', 'eval_samples': 3,
        'source': {'name': 'prototype', 'mode': 'signed_constant', 'rest': 'fixed'}}
  c = tiny_config(mnist_slice, param=sm, eval_every=4, stop_at_step=12,
                  **{'optimizer.name': 'sgd', 'optimizer.lr': 50.0})
  first = train_and_evaluate(c, str(tmp_path))
  evals = [r for r in read_metrics(tmp_path) if 'test_accuracy' in r]
  assert [r['step'] for r in evals] == [4, 8, 12]
  best = max(evals, key=lambda r: (r['test_accuracy'], r['step']))
  assert first['best_test_accuracy'] == best['test_accuracy']
  c.stop_at_step = None
  out = train_and_evaluate(c, str(tmp_path))
  evals = [r for r in read_metrics(tmp_path) if 'test_accuracy' in r]
  assert [r['step'] for r in evals] == [4, 8, 12, 16, 20, 24]
  best = max(evals, key=lambda r: (r['test_accuracy'], r['step']))
  assert (out['best_test_accuracy'], out['best_step']) == (best['test_accuracy'], best['step'])
  assert out['test_accuracy'] == evals[-1]['test_accuracy'] and out['test_accuracy'] > 0.2


def _main(args, env=None, **kw):
  e = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
  return subprocess.Popen([sys.executable, '-m', 'pemn_jax.main', *args], cwd=REPO, env=e,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _cli_args(mnist_slice, workdir, *extra, eval_batch=100):
  return ['--config', 'configs/quickstart.py', '--workdir', str(workdir),
          f'--config.source_dir={mnist_slice["source_dir"]}', '--config.dataset=mnist',
          f'--config.data_dir={mnist_slice["data_dir"]}', '--config.batch_size=32',
          f'--config.eval_batch_size={eval_batch}', *extra]


def test_sigterm_checkpoints_and_the_run_completes(mnist_slice, tmp_path):
  # Prepare the data first, so the signal lands in the training loop.
  from pemn_jax.data import sources
  sources.load('mnist', 'train', mnist_slice['data_dir'], mnist_slice['source_dir'])
  args = _cli_args(mnist_slice, tmp_path, '--config.num_steps=100000', '--config.log_every=1',
                   '--config.checkpoint_every=100000')
  p = _main(args)
  lines = []
  for line in p.stdout:
    lines.append(line)
    if line.startswith('step 3/'):
      p.send_signal(signal.SIGTERM)
      break
  rest, _ = p.communicate(timeout=120)
  assert p.returncode == 0, ''.join(lines) + rest
  assert 'checkpoint saved at step' in rest
  steps = [int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  # The run completes from that checkpoint.
  p = _main(_cli_args(mnist_slice, tmp_path, f'--config.num_steps={steps[0] + 5}'))
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  assert f'resumed from step {steps[0]}' in out and f'final: step {steps[0] + 5}' in out


def test_eight_devices_match_one_device(mnist_slice, tmp_path):
  from pemn_jax.data import sources
  sources.load('mnist', 'train', mnist_slice['data_dir'], mnist_slice['source_dir'])
  losses = {}
  for n in (1, 8):
    wd = tmp_path / f'dev{n}'
    p = _main(_cli_args(mnist_slice, wd, '--config.num_steps=12', '--config.log_every=1',
                        eval_batch=40),
              env={'JAX_NUM_CPU_DEVICES': str(n), 'XLA_FLAGS': ''})
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert f'devices={n}' in out
    losses[n] = [r['loss'] for r in read_metrics(wd) if 'loss' in r]
  assert len(losses[1]) == 12
  np.testing.assert_allclose(losses[8], losses[1], rtol=2e-4, atol=2e-5)


def test_bad_config_key_and_values_are_named():
  c = base_config()
  c.unlock()
  c.learning_rate = 0.1
  with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
    validate(c)
  for key, value, match in [('optimizer.lr', -1.0, 'optimizer.lr'),
                            ('model', 'alexnet', 'config.model'),
                            ('dataset', 'svhn', 'config.dataset'),
                            ('batch_size', 0, 'config.batch_size'),
                            ('optimizer.schedule', 'warm', 'optimizer.schedule'),
                            # an older config's "the default" says what it meant
                            ('data_dir', '', "data_dir='' .*meant the default"),
                            ('num_steps', 0, 'num_steps=0 .*meant the default')]:
    c = base_config()
    a, _, b = key.partition('.')
    if b:
      c[a][b] = value
    else:
      c[a] = value
    with pytest.raises(ConfigError, match=match):
      validate(c)


def test_cli_rejects_unknown_key_and_bad_param(mnist_slice, tmp_path):
  p = _main(_cli_args(mnist_slice, tmp_path, '--config.no_such_key=3'))
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0 and 'no_such_key' in out
  p = _main(_cli_args(mnist_slice, tmp_path, '--config.param.keep=2.0'))
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 2 and 'keep' in out and 'Traceback' not in out


def test_missing_data_dir_is_a_clear_error(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, source_dir=str(tmp_path / 'absent'), data_dir=str(tmp_path / 'd'))
  with pytest.raises(DataError, match='absent'):
    train_and_evaluate(c, str(tmp_path / 'run'))


def _digest(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      path = os.path.join(dirpath, f)
      h.update(path.encode())
      with open(path, 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_corrupt_checkpoint_is_a_clear_error_and_left_untouched(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, num_steps=8, stop_at_step=8)
  train_and_evaluate(c, str(tmp_path))
  ckdir = tmp_path / 'checkpoints'
  # Corrupt every data file of the state item.
  for dirpath, _, files in os.walk(ckdir / '8' / 'state'):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, 'r+b') as fh:
        data = fh.read()
        fh.seek(0)
        fh.write(bytes(b ^ 0x5A for b in data[:64]))
  before = _digest(ckdir)
  c.num_steps, c.stop_at_step = 16, None
  with pytest.raises(CheckpointError, match='step 8.*left untouched'):
    train_and_evaluate(c, str(tmp_path))
  assert _digest(ckdir) == before


def test_changed_param_shapes_on_resume_is_a_clear_error(mnist_slice, tmp_path):
  c = tiny_config(mnist_slice, num_steps=8, param={'name': 'ring', 'dof': 100})
  train_and_evaluate(c, str(tmp_path))
  before = _digest(tmp_path / 'checkpoints')
  c.num_steps = 16
  c.param = {'name': 'ring', 'dof': 200}
  with pytest.raises(ConfigError, match=r'param\.dof: checkpoint 100, this run 200'):
    train_and_evaluate(c, str(tmp_path))
  assert _digest(tmp_path / 'checkpoints') == before


def test_two_processes_match_one_process(mnist_slice, tmp_path):
  """A multi-host job in miniature: 2 processes x 1 CPU device over gloo
  (jax.distributed), each reading its half of every global batch."""
  losses = {}
  for n in (1, 2):
    wd = tmp_path / f'proc{n}'
    args = _cli_args(mnist_slice, wd, '--config.num_steps=8', '--config.log_every=1',
                     eval_batch=40)
    cmd = ['bash', 'launch/local.sh', str(n), *args] if n > 1 else None
    if cmd:
      p = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHON=sys.executable,
                                                   JAX_NUM_CPU_DEVICES='1'),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:
      p = _main(args, env={'JAX_NUM_CPU_DEVICES': '1'})
    try:
      out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      p.kill()
      raise
    assert p.returncode == 0, out
    assert f'processes={n}' in out
    losses[n] = [r['loss'] for r in read_metrics(wd) if 'loss' in r]
  assert len(losses[1]) == 8
  np.testing.assert_allclose(losses[2], losses[1], rtol=2e-4, atol=2e-5)


def test_tensorboard_records_are_written_without_importing_torch(tmp_path):
  # A torch that breaks any process importing it: tensorboardX's writer
  # imports torch where installed; the tracker must not let it, and must
  # leave torch importable (the fake's error, not an ImportError) afterwards.
  fake = tmp_path / 'site' / 'torch'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text("raise RuntimeError('torch was imported')\n")
  code = '\n'.join([
      'import sys',
      'from pemn_jax.train.tracking import Tracker',
      "t = Tracker(sys.argv[1], {'trainable': 1, 'model_bytes': 4}, lambda s: 0.1, 8, True)",
      't.resume(0, None)',
      "t.write({'step': 3, 'loss': 0.25})",
      't.close()',
      "assert 'torch' not in sys.modules",
      'try:',
      '  import torch',
      'except RuntimeError as e:',
      '  print(e)'])
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path / 'site'), str(REPO)])}
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'run')], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == 'torch was imported'
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(tmp_path / 'run' / 'tensorboard'))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(3, 0.25)]

"""One error policy across the command-line entry points: every mistake in a
flag, config key, config argument, config path or value exits 2 with one
line naming it (a "did you mean" where one is close), never a traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

QS = ['--config', 'configs/quickstart.py', '--workdir', '/tmp/pemn_never_made']
EVOLVE = ['pemn_jax.evolve', '--workdir', '/nonexistent_run', '--out', '/tmp/x.pemn']
ABLATE = ['pemn_jax.ablate', '--config', 'configs/quickstart.py', '--workdir', '/tmp/pemn_nope']

# (module and flags, what the one line must say)
MISTAKES = [
    (['pemn_jax.main', *QS, '--config.num_epoch=1'],
     '--config.num_epoch: no such config key (did you mean --config.num_epochs?)'),
    (['pemn_jax.main', *QS, '--config.optimizer.lrr=1'],
     'did you mean --config.optimizer.lr?'),
    (['pemn_jax.main', *QS, '--config.nonexistent=1'], '--config.nonexistent: no such config key'),
    (['pemn_jax.main', *QS, '--config.param.kind=x'], 'did you mean --config.param.name?'),
    (['pemn_jax.main', '--config', 'configs/pemn.py:mod=rp', '--workdir', '/tmp/x'],
     "unknown config argument 'mod' (did you mean mode?)"),
    (['pemn_jax.main', '--config', 'configs/pemnn.py', '--workdir', '/tmp/x'],
     'no such config file (did you mean configs/pemn.py?)'),
    (['pemn_jax.main', '--config', 'configs/pemn.py:epochs=abc', '--workdir', '/tmp/x'],
     "epochs='abc': not a float"),
    (['pemn_jax.main', '--config', 'configs/quickstart.py:dense=maybe', '--workdir', '/tmp/x'],
     "dense='maybe': not a bool"),
    (['pemn_jax.main', *QS, '--config.batch_size=abc'], '--config.batch_size=abc'),
    (['pemn_jax.main', *QS, '--config.batch_size=0'], 'config.batch_size=0 is invalid'),
    (['pemn_jax.main', *QS, '--config.model_kwargs.hidden=(1,'], '--config.model_kwargs.hidden'),
    (['pemn_jax.main', *QS, '--config.dataset=mnistt'], "did you mean 'mnist'?"),
    (['pemn_jax.main', *QS, '--config.model=resnet_18'], "did you mean 'resnet18'?"),
    (['pemn_jax.main', *QS, '--config.optimizer.name=adamx'], "did you mean 'adam'?"),
    (['pemn_jax.main', *QS, '--config.param.keep=1.5'], 'keep fraction must be in (0, 1]'),
    (['pemn_jax.main', *QS, '--config.model=os:getcwd'], "'os:getcwd' is a builtin_function_"
     'or_method, not a model'),
    (['pemn_jax.main', *QS, '--config.model_kwargs.hidden=(0,)'],
     "config.model_kwargs={'hidden': (0,)}: model 'mlp' cannot be built"),
    (['pemn_jax.main', '--config', 'configs/quickstart.py:epochs=-1', '--workdir', '/tmp/x'],
     'config.num_epochs=-1.0 is invalid'),
    (['pemn_jax.main', *QS, '--bogus=1'], 'unknown flag --bogus'),
    (['pemn_jax.main', '--config', 'configs/quickstart.py', '--workdirr=/x'],
     'unknown flag --workdirr (did you mean --workdir?)'),
    (['pemn_jax.main', '--config', 'configs/quickstart.py'], '--workdir'),
    (['pemn_jax.main', *QS, 'extra'], "unexpected arguments: ['extra']"),
    (['pemn_jax.main', *QS, '--num_processes=2'], 'go together'),
    (['pemn_jax.export', '--workdir', '/nonexistent_run', '--out', '/tmp/x.pemn'],
     'no checkpoint in /nonexistent_run'),
    (['pemn_jax.export', '--workdir', '/x', '--out', '/tmp/x.pemn', '--float_codec', 'f8'],
     '--float_codec=f8'),
    (['pemn_jax.export', '--workdir', '/x'], '--out'),
    (['pemn_jax.export', '--workdir', '/x', '--out', '/tmp/x.pemn', '--float_bits', '1'],
     '--float_bits=1: 1 is not an integer in the range [2, 16]'),
    (['pemn_jax.export', '--workdir', '/x', '--out', '/tmp/x.pemn', '--float_bits', '8',
      '--float_codec', 'f16'], 'instead of --float_codec: give one of them'),
    ([*EVOLVE, '--density', 'Dense_1/kernel'], 'each --density is KERNEL=FRACTION'),
    (['pemn_jax.evaluate', '--artifact', '/nonexistent.pemn'], 'cannot read model file'),
    (['pemn_jax.evaluate', '--artifact', 'README.md'], 'is not a pemn_jax model file'),
    (['pemn_jax.evaluate', '--artifact', 'x.pemn', '--batch_size', '0'], '--batch_size=0'),
    ([*EVOLVE, '--sparsity', '1.5'], '--sparsity must be below 1'),
    ([*EVOLVE, '--sparsity=-0.1'], '--sparsity=-0.1'),
    ([*EVOLVE, '--population', '0'], '--population=0'),
    ([*EVOLVE, '--min_bits', '0'], '--min_bits=0'),
    ([*EVOLVE, '--method', 'dee'], '--method=dee'),
    ([*EVOLVE], 'no checkpoint in /nonexistent_run'),
    ([*ABLATE, '--sweep', 'arg.keep='], 'empty value'),
    ([*ABLATE, '--sweep', 'kep=0.1,0.2'], "the config has no key 'kep'"),
    ([*ABLATE, '--sweep', 'arg.kep=0.1'], 'did you mean keep?'),
    ([*ABLATE, '--sweep', 'arg.keep=0.1', '--max_group', '-1'], '--max_group=-1'),
    ([*ABLATE], '--sweep'),
    (['pemn_jax.ablate', '--config', 'configs/quickstartt.py', '--workdir', '/tmp/x', '--sweep',
      'arg.keep=0.1'], 'no such config file (did you mean configs/quickstart.py?)'),
    (['pemn_jax.plot', '/nonexistent_run'], 'no metrics.jsonl'),
    (['pemn_jax.plot', '--metricz', 'loss', '/x'], 'did you mean --metrics?'),
    (['pemn_jax.plot'], 'usage: python -m pemn_jax.plot'),
]


def _run(argv):
  return subprocess.run([sys.executable, '-m', *argv], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.parametrize('argv,says', MISTAKES, ids=[' '.join(a[2:] if a[0] == 'pemn_jax.main'
                                                              else a)[:60] for a, _ in MISTAKES])
def test_a_mistake_exits_2_with_one_line(argv, says):
  r = _run(argv)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(('W', 'I'))]
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert says in lines[0], lines[0]


@pytest.mark.parametrize('module,more', [('pemn_jax.main', []),
                                         ('pemn_jax.ablate', ['--sweep', 'seed=0,1'])])
def test_a_bad_host_memory_setting_exits_2_before_training(module, more, tmp_path):
  workdir = tmp_path / 'run'
  argv = [module, '--config', 'configs/quickstart.py', '--workdir', str(workdir), *more]
  r = subprocess.run([sys.executable, '-m', *argv], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                                       'PEMN_JAX_HOST_MEMORY': 'kept'})
  lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(('W', 'I'))]
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert lines == ["error: PEMN_JAX_HOST_MEMORY='kept': expected auto, keep or release"], lines
  assert not workdir.exists()


def test_a_config_that_cannot_be_built_leaves_no_workdir(tmp_path):
  """A mistake found only when the run is built (the parameterization's keep
  fraction) is refused before the workdir is made or locked."""
  workdir = tmp_path / 'run'
  r = _run(['pemn_jax.main', '--config', 'configs/quickstart.py', '--workdir', str(workdir),
            '--config.param.keep=1.5'])
  assert r.returncode == 2 and 'keep fraction must be in (0, 1]' in r.stderr, r.stderr[-2000:]
  assert not workdir.exists()


def test_enough_mistakes_are_covered():
  assert len(MISTAKES) >= 30
  assert {a[0] for a, _ in MISTAKES} == {'pemn_jax.main', 'pemn_jax.export', 'pemn_jax.evaluate',
                                         'pemn_jax.evolve', 'pemn_jax.ablate', 'pemn_jax.plot'}


def test_library_imports_define_no_command_flags():
  """``plot`` is imported as a library (sweep reports): its command's flags must
  not be defined then, or a process that also imports another command's module
  (``evolve``'s ``--out``) fails with DuplicateFlagError."""
  code = ('import pemn_jax.plot, pemn_jax.sweep\n'
          'from absl import flags\n'
          'assert "out" not in flags.FLAGS and "metrics" not in flags.FLAGS\n'
          'import pemn_jax.evolve.__main__\n'
          'print("ok")')
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-2000:]


def test_sigint_stops_evolve_with_its_search_saved(tmp_path, mnist_slice):
  """Ctrl-C on evolve: the search is saved between generations, exit 0, and
  the same command resumes it."""
  from conftest import tiny_config

  from pemn_jax.train.loop import train_and_evaluate
  run = tmp_path / 'run'
  train_and_evaluate(tiny_config(mnist_slice, num_steps=4, param={'name': 'dense'}), str(run))
  argv = [sys.executable, '-m', 'pemn_jax.evolve', '--workdir', str(run), '--out',
          str(tmp_path / 'm.pemn'), '--finetune_steps', '1', '--population', '4',
          '--sparsity', '0.95', '--log_every', '1']
  p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  out = ''
  deadline = time.time() + 240
  while time.time() < deadline:
    line = p.stdout.readline()
    out += line
    if line.startswith('gen 2 '):
      p.send_signal(signal.SIGINT)
      break
  rest, _ = p.communicate(timeout=240)
  assert p.returncode == 0, out + rest
  assert 'Traceback' not in rest and 'run the same command to continue' in rest, rest
  stopped = int(rest.split('stopped after generation ')[1].split(';')[0])
  r = subprocess.run(argv + ['--max_generations', '1'], cwd=REPO, capture_output=True,
                     text=True, timeout=240)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f'resumed the de search at generation {stopped}' in r.stdout + r.stderr

"""Sweeps (pemn_jax.sweep, python -m pemn_jax.ablate): vmapped variants equal
single runs; interrupted sweeps resume without redoing finished variants."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from pemn_jax.config import ConfigError
from pemn_jax.sweep import expand, group, parse_sweeps, run_sweep
from pemn_jax.sweep.report import summarize
from pemn_jax.train.loop import train_and_evaluate
from pemn_jax.train.run import restore

CONFIG = '''
from pemn_jax.config import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, ratio=0.01, steps=6, bn=False, dense=False, sgd=False)
  c = base_config()
  c.dataset = 'mnist'
  c.source_dir, c.data_dir = {source!r}, {data!r}
  c.model = 'resnet20' if a.bn else 'mlp'
  if not a.bn:
    c.model_kwargs.hidden = (32,)
  c.param = {{'name': 'masked', 'keep': 0.5,
             'source': {{'name': 'prototype', 'mode': 'rp', 'ratio': a.ratio, 'rescale': True}}}}
  if a.dense:
    c.param = {{'name': 'dense'}}
  c.optimizer.update(name='adamw', lr=0.02, weight_decay=0.0, schedule='onecycle')
  if a.sgd:
    c.optimizer.update(name='sgd', lr=0.01, schedule='constant')
  c.batch_size, c.eval_batch_size = 32, 100
  c.num_steps, c.log_every, c.checkpoint_every = a.steps, 1, 2
  c.train_limit, c.test_limit = 512, 200
  return c
'''


@pytest.fixture
def config_file(mnist_slice, tmp_path):
  path = tmp_path / 'tiny_sweep_config.py'
  path.write_text(CONFIG.format(source=mnist_slice['source_dir'], data=mnist_slice['data_dir']))
  return str(path)


def _losses(run_dir):
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return np.array([r['loss'] for r in map(json.loads, f) if 'loss' in r])


def _same_as_single_runs(config, sweeps, workdir, tmp_path, check=None, rtol=2e-5):
  """Runs the sweep, then the chosen variants alone (the trainer, their
  stored configs); returns the sweep's results."""
  results = run_sweep(config, sweeps, workdir, plots=False, say=lambda m: None)
  variants = expand(config, parse_sweeps(sweeps))
  assert [r['variant'] for r in results] == [v.name for v in variants]
  for v, r in zip(variants, results):
    if check is not None and v.name not in check:
      continue
    single = str(tmp_path / f'single_{v.name}')
    out = train_and_evaluate(v.config, single)
    swept = _losses(os.path.join(workdir, v.name))
    alone = _losses(single)
    assert len(swept) == len(alone) == v.config.num_steps
    np.testing.assert_allclose(swept, alone, rtol=rtol, err_msg=v.name)
    assert r['test_accuracy'] == pytest.approx(out['test_accuracy'], abs=0.011), v.name
    assert r['test_loss'] == pytest.approx(out['test_loss'], rel=10 * rtol), v.name
    # The variant's directory is an ordinary run: its state loads as the single run's.
    sw, al = restore(os.path.join(workdir, v.name)).train_state, restore(single).train_state
    for part in ('state', 'model_state'):
      a = np.concatenate([np.ravel(x) for x in _leaves(getattr(sw, part))] + [np.zeros(1)])
      b = np.concatenate([np.ravel(x) for x in _leaves(getattr(al, part))] + [np.zeros(1)])
      # Relative L2 distance: a variant trained with another's hyperparameters,
      # seed or batch statistics is O(1) away; rounding is far below.
      assert np.linalg.norm(a - b) <= 10 * rtol * np.linalg.norm(b), (v.name, part)
      if rtol <= 1e-4:  # well-conditioned models: elementwise too
        np.testing.assert_allclose(a, b, rtol=50 * rtol, atol=rtol, err_msg=f'{v.name} {part}')
  return results


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_k_seeds_vmapped_equal_k_single_runs(config_file, tmp_path):
  results = _same_as_single_runs(config_file, ['seed=0,1,2'], str(tmp_path / 'sweep'), tmp_path)
  assert {r['group_size'] for r in results} == {3}
  # The seeds really differ (a sweep that ignored them would fail here).
  assert len({round(r['test_loss'], 6) for r in results}) == 3


def test_lr_keep_and_weight_decay_variants_vmapped_equal_single_runs(config_file, tmp_path):
  sweeps = ['optimizer.lr=0.01,0.05', 'param.keep=0.3,0.7', 'optimizer.weight_decay=0,0.1']
  check = {'optimizer.lr=0.01,param.keep=0.7,optimizer.weight_decay=0.1',
           'optimizer.lr=0.05,param.keep=0.3,optimizer.weight_decay=0',
           'optimizer.lr=0.05,param.keep=0.7,optimizer.weight_decay=0.1'}
  results = _same_as_single_runs(config_file, sweeps, str(tmp_path / 'sweep'), tmp_path, check)
  assert {r['group_size'] for r in results} == {8}
  assert len({round(r['test_loss'], 6) for r in results}) == 8


def test_batch_norm_variants_vmapped_equal_single_runs(config_file, tmp_path):
  # ResNet-20's float32 gradients at init are ill-conditioned (3% off float64
  # in both the single and the batched step, measured), and Adam's first
  # steps and top-k masks amplify such differences: dense weights and SGD
  # here, to check that each variant keeps its own batch statistics.
  cfg = config_file + ':bn=true,steps=3,dense=true,sgd=true'
  _same_as_single_runs(cfg, ['seed=0,1'], str(tmp_path / 'sweep'), tmp_path, {'seed=1'},
                       rtol=1e-3)


def test_an_interrupted_sweep_resumes_without_redoing_finished_variants(config_file, tmp_path):
  sweeps = ['arg.ratio=0.01,0.1', 'seed=0,1']  # two groups (prototype lengths differ) of two
  straight = run_sweep(config_file, sweeps, str(tmp_path / 'straight'), plots=False,
                       say=lambda m: None)

  class Interrupt(Exception):
    pass

  def stop_in_group_2(msg):
    if msg.startswith('[group 2/2') and ' step 3/' in msg:
      raise Interrupt
  wd = str(tmp_path / 'sweep')
  with pytest.raises(Interrupt):
    run_sweep(config_file, sweeps, wd, plots=False, say=stop_in_group_2)
  first = [v for v in expand(config_file, parse_sweeps(sweeps)) if 'ratio=0.01' in v.name]
  stamps = {v.name: os.stat(os.path.join(wd, v.name, 'result.json')).st_mtime_ns for v in first}
  second = [v.name for v in expand(config_file, parse_sweeps(sweeps)) if 'ratio=0.1,' in v.name]
  assert not any(os.path.exists(os.path.join(wd, n, 'result.json')) for n in second)
  ckpts = sorted(os.listdir(os.path.join(wd, second[0], 'checkpoints')))
  assert '2' in ckpts and '6' not in ckpts

  said = []
  resumed = run_sweep(config_file, sweeps, wd, plots=False, say=said.append)
  assert any('2 already finished; 1 group(s) to train' in m for m in said), said
  assert not any(m.startswith('[group 2/') for m in said)  # only one group left to train
  assert {v.name: os.stat(os.path.join(wd, v.name, 'result.json')).st_mtime_ns
          for v in first} == stamps
  for a, b in zip(straight, resumed):
    assert a['variant'] == b['variant']
    assert a['test_accuracy'] == b['test_accuracy'] and a['test_loss'] == b['test_loss']
    np.testing.assert_array_equal(_losses(os.path.join(str(tmp_path / 'straight'), a['variant'])),
                                  _losses(os.path.join(wd, b['variant'])))
  for name in ('results.csv', 'results.md'):
    assert os.path.exists(os.path.join(wd, name))
  # A variant exports to a model file holding exactly its network.
  import jax

  from pemn_jax.export.model_file import export_run, load
  out = str(tmp_path / 'variant.pemn')
  variant_dir = os.path.join(wd, resumed[-1]['variant'])
  export_run(variant_dir, out)
  r = restore(variant_dir)
  param, ts = r.param, r.train_state
  want = param.materialize(ts.state, ts.seed)
  got = load(out)[2]
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A finished sweep run again trains nothing.
  said.clear()
  run_sweep(config_file, sweeps, wd, plots=False, say=said.append)
  assert any('4 already finished; 0 group(s) to train' in m for m in said)


def test_a_sweep_stopped_by_sigterm_saves_and_its_rerun_equals_an_uninterrupted_one(
    config_file, tmp_path):
  # A sweep trains through the trainer's own loop: SIGTERM mid-group saves
  # every variant of the group at that step and stops the sweep cleanly.
  sweeps = ['arg.ratio=0.01,0.1', 'seed=0,1']  # two groups of two
  straight = run_sweep(config_file, sweeps, str(tmp_path / 'straight'), plots=False,
                       say=lambda m: None)

  def term_in_group_2(msg):
    if msg.startswith('[group 2/2') and ' step 3/' in msg:
      signal.raise_signal(signal.SIGTERM)  # delivered to the loop's handler (main thread)
  wd = str(tmp_path / 'sweep')
  said = []
  assert run_sweep(config_file, sweeps, wd, plots=False,
                   say=lambda m: (said.append(m), term_in_group_2(m))) is None
  assert any('checkpoint saved at step 3' in m for m in said), said
  second = [v.name for v in expand(config_file, parse_sweeps(sweeps)) if 'ratio=0.1,' in v.name]
  for name in second:
    assert not os.path.exists(os.path.join(wd, name, 'result.json'))
    assert '3' in os.listdir(os.path.join(wd, name, 'checkpoints'))
  resumed = run_sweep(config_file, sweeps, wd, plots=False, say=lambda m: None)
  for a, b in zip(straight, resumed, strict=True):
    assert a['variant'] == b['variant']
    assert a['test_accuracy'] == b['test_accuracy'] and a['test_loss'] == b['test_loss']
    np.testing.assert_array_equal(_losses(os.path.join(str(tmp_path / 'straight'), a['variant'])),
                                  _losses(os.path.join(wd, b['variant'])))


def test_grouping(config_file):
  def groups(sweeps):
    return [[v.name for v in g] for g in group(expand(config_file, parse_sweeps(sweeps)))]
  assert len(groups(['seed=0,1', 'optimizer.lr=0.1,0.2', 'param.keep=0.2,0.4'])) == 1
  assert groups(['arg.ratio=0.01,0.1', 'seed=0,1']) == [
      ['arg.ratio=0.01,seed=0', 'arg.ratio=0.01,seed=1'],
      ['arg.ratio=0.1,seed=0', 'arg.ratio=0.1,seed=1']]
  assert len(groups(['param.source.ratio=0.01,0.1'])) == 2
  assert len(groups(['optimizer.name=adam,sgd'])) == 2
  # Every variant reads the base config's batches.
  assert {v.config.data_seed for v in expand(config_file, parse_sweeps(['seed=3,4']))} == {0}


def test_bad_sweeps_are_named(config_file, tmp_path):
  for sweeps, named in [(['nokey=1,2'], "no key 'nokey'"),
                        (['seed=0,x'], "seed='x': not a int"),
                        (['seed=0.5'], "seed='0.5': not a int"),
                        (['seed'], 'is not key=v1'),
                        (['seed=0,,1'], 'empty value'),
                        (['seed=0,0'], 'repeats a value'),
                        (['seed=0', 'seed=1'], 'given twice'),
                        (['optimizer.lr=-1'], 'optimizer.lr'),
                        (['arg.nope=1'], 'nope')]:
    with pytest.raises(ConfigError, match=named):
      run_sweep(config_file, sweeps, str(tmp_path / 'bad'), plots=False, say=lambda m: None)
  with pytest.raises(ConfigError, match='missing.py: no such config file'):
    run_sweep(str(tmp_path / 'missing.py'), ['seed=0'], str(tmp_path / 'bad'), plots=False)
  # A workdir holding another sweep is refused, and left as it was.
  wd = tmp_path / 'other'
  wd.mkdir()
  (wd / 'sweep.json').write_text('{"config": "x.py", "sweeps": ["seed=0"], "set": []}')
  with pytest.raises(ConfigError, match='holds another sweep'):
    run_sweep(config_file, ['seed=0,1'], str(wd), plots=False, say=lambda m: None)
  assert json.loads((wd / 'sweep.json').read_text())['config'] == 'x.py'


def test_summary_over_seeds():
  rs = [{'values': {'seed': s, 'param.keep': k}, 'test_accuracy': a, 'best_test_accuracy': b}
        for s, k, a, b in [(0, 0.3, 0.5, 0.6), (1, 0.3, 0.7, 0.8), (0, 0.5, 0.9, 0.9)]]
  rows = summarize(rs, ['seed', 'param.keep'])
  assert rows[0]['param.keep'] == 0.3 and rows[0]['n'] == 2
  assert rows[0]['final_mean'] == pytest.approx(0.6)
  assert rows[0]['final_std'] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert rows[1]['n'] == 1 and rows[1]['final_std'] == 0.0


def test_cli_writes_tables_and_plots_and_exits_2_on_a_bad_sweep(config_file, tmp_path):
  wd = tmp_path / 'cli'
  args = [sys.executable, '-m', 'pemn_jax.ablate', '--config', config_file, '--sweep',
          'param.keep=0.3,0.6', '--set', 'num_steps=2', '--workdir', str(wd)]
  p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  for name in ('results.csv', 'results.md', 'sweep.png', 'curves.png', 'sweep.json'):
    assert (wd / name).exists(), name
  rows = (wd / 'results.csv').read_text().splitlines()
  assert rows[0].startswith('variant,param.keep,test_accuracy') and len(rows) == 3
  p = subprocess.run(args[:-2] + ['--sweep', 'param.nothing=1', '--workdir', str(tmp_path / 'x')],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and 'param.nothing' in p.stderr


def test_tuples_new_model_arguments_and_names_as_written():
  v = expand('configs/dense.py:model=mlp', parse_sweeps(['model_kwargs.hidden=4x,30x10']))
  assert [x.config.model_kwargs.hidden for x in v] == [(4,), (30, 10)]
  assert [x.name for x in v] == ['model_kwargs.hidden=4x', 'model_kwargs.hidden=30x10']
  v = expand('configs/quickstart.py', parse_sweeps(['optimizer.weight_decay=0,1e-3']))
  assert [x.name for x in v] == ['optimizer.weight_decay=0', 'optimizer.weight_decay=1e-3']
  assert [x.config.optimizer.weight_decay for x in v] == [0.0, 1e-3]
  with pytest.raises(ConfigError, match="no key 'nope'"):
    expand('configs/quickstart.py', parse_sweeps(['seed=0']), ['nope=1'])
  # Only a model argument may be new (the model checks it when it is built).
  with pytest.raises(ConfigError, match="no key 'optimizer.nope'"):
    expand('configs/quickstart.py', parse_sweeps(['seed=0']), ['optimizer.nope=1'])


def test_a_sweep_on_two_devices_equals_one_device(config_file, tmp_path):
  # The batch is split over the devices, the stacked states replicated.
  one = run_sweep(config_file, ['seed=0,1'], str(tmp_path / 'one'), plots=False,
                  say=lambda m: None)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2')
  p = subprocess.run([sys.executable, '-m', 'pemn_jax.ablate', '--config', config_file,
                      '--sweep', 'seed=0,1', '--noplots', '--workdir', str(tmp_path / 'two')],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  for r in one:
    two = json.loads((tmp_path / 'two' / r['variant'] / 'result.json').read_text())
    np.testing.assert_allclose(_losses(str(tmp_path / 'two' / r['variant'])),
                               _losses(str(tmp_path / 'one' / r['variant'])), rtol=1e-4)
    assert two['test_loss'] == pytest.approx(r['test_loss'], rel=1e-3)


def test_markdown_tables_have_as_many_cells_as_columns(tmp_path):
  from pemn_jax.sweep.report import write
  rs = [{'variant': f'seed={s}', 'values': {'seed': s}, 'test_accuracy': 0.5 + s / 10,
         'best_test_accuracy': 0.6, 'best_step': 2, 'test_loss': 1.0, 'step': 2, 'trainable': 3,
         'model_bytes': 4, 'dense_bytes': 5, 'group_size': 2, 'group_wall_s': 1.0}
        for s in (0, 1)]
  for keys in (['seed'], ['seed', 'param.keep']):
    for r in rs:
      r['values']['param.keep'] = 0.5
    write(str(tmp_path), rs, keys, plots=False)
    table = [ln for ln in (tmp_path / 'results.md').read_text().splitlines() if ln.startswith('|')]
    blocks, current = [], []
    for ln in (tmp_path / 'results.md').read_text().splitlines():
      if ln.startswith('|'):
        current.append(ln.count('|'))
      elif current:
        blocks.append(current)
        current = []
    blocks.append(current)
    assert table and all(len(set(b)) == 1 for b in blocks if b), blocks

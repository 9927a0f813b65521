"""The 'add a method' guide's example, executed from the doc: built, trained,
exported and loaded back with no edit to the library."""

import re

import pytest
from conftest import REPO, tiny_config

from pemn_jax import params as param_lib


@pytest.fixture
def low_rank():
  text = (REPO / 'docs' / 'adding_a_method.md').read_text()
  code = re.search(r'```python\n(.*?)```', text, re.S).group(1)
  assert len(code.splitlines()) < 70
  namespace = {}
  exec(compile(code, 'adding_a_method.md', 'exec'), namespace)  # noqa: S102 - our own doc
  yield namespace['LowRank']
  del param_lib.REGISTRY['low_rank']


def test_the_guides_method_builds_trains_and_exports(low_rank, mnist_slice, tmp_path):
  from pemn_jax.evaluate import evaluate_artifact
  from pemn_jax.export.model_file import export_run, load
  from pemn_jax.train.loop import train_and_evaluate
  c = tiny_config(mnist_slice, param={'name': 'low_rank', 'rank': 4}, **{'optimizer.lr': 0.02})
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  assert out['test_accuracy'] > 0.3
  # Trained state: the factors (rank 4) and the biases, not the kernels.
  assert out['trainable'] == 4 * (784 + 32) + 4 * (32 + 10) + 32 + 10
  path = str(tmp_path / 'lr.pemn')
  export_run(str(tmp_path / 'run'), path, params_dir=None)
  header, _, _, _ = load(path)
  assert header['param']['name'] == 'low_rank' and header['param']['rank'] == 4
  ev = evaluate_artifact(path, 'mnist', mnist_slice['data_dir'], mnist_slice['source_dir'])
  assert ev['accuracy'] == pytest.approx(out['test_accuracy'], abs=1e-9)
  with pytest.raises(ValueError, match='already registered'):
    param_lib.register('low_rank', low_rank)
  with pytest.raises(TypeError, match='not a Parameterization'):
    param_lib.register('nope', dict)


def test_the_guides_method_through_the_clis(mnist_slice, tmp_path):
  """The guide's module, saved as a file, used from the command line: train
  with --import, then export (the run recorded config.imports) and evaluate
  (--import again: files never import code)."""
  import subprocess
  import sys
  text = (REPO / 'docs' / 'adding_a_method.md').read_text()
  module = tmp_path / 'low_rank.py'
  module.write_text(re.search(r'```python\n(.*?)```', text, re.S).group(1))
  run, out = tmp_path / 'run', tmp_path / 'lr.pemn'
  data = [f'--config.source_dir={mnist_slice["source_dir"]}',
          f'--config.data_dir={mnist_slice["data_dir"]}']

  def cli(*argv):
    r = subprocess.run([sys.executable, '-m', *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout + r.stderr

  rc, log = cli('pemn_jax.main', '--import', str(module), '--config',
                'configs/dense.py:model=mlp,dataset=mnist', '--workdir', str(run),
                '--config.param.name=low_rank', '--config.num_steps=4',
                '--config.train_limit=64', '--config.test_limit=50', '--config.batch_size=16',
                '--config.eval_batch_size=50', '--config.eval_every=0', *data)
  assert rc == 0, log[-2000:]
  rc, log = cli('pemn_jax.export', '--workdir', str(run), '--out', str(out))
  assert rc == 0 and 'wrote' in log, log[-2000:]
  rc, log = cli('pemn_jax.evaluate', '--artifact', str(out), '--data_dir', mnist_slice['data_dir'],
                '--source_dir', mnist_slice['source_dir'])
  assert rc == 2 and "unknown parameterization 'low_rank'" in log, log[-2000:]
  assert '--import' in log  # the message says how
  rc, log = cli('pemn_jax.evaluate', '--import', str(module), '--artifact', str(out),
                '--data_dir', mnist_slice['data_dir'], '--source_dir', mnist_slice['source_dir'])
  assert rc == 0 and 'accuracy' in log, log[-2000:]
  rc, log = cli('pemn_jax.evaluate', '--import', 'no_such_module_xyz', '--artifact', str(out))
  assert rc == 2 and "cannot import 'no_such_module_xyz'" in log, log[-2000:]

"""The full-scale configs (configs/full/*.py): each builds, its train step
compiles at its global batch on its intended device count (per-device memory
from XLA's memory analysis), and 2 steps train on generated data of its shape
(``benchmarks/fullscale.py``, one process per config with
``JAX_NUM_CPU_DEVICES`` = the config's ``DEVICES``)."""

import math
import re
import subprocess
import sys

import pytest
from conftest import REPO

CONFIGS = sorted(p.name for p in (REPO / 'configs' / 'full').glob('*.py'))


def test_there_is_one_per_paper_run():
  assert CONFIGS == ['edge_popup_resnet50_imagenet.py', 'pemn_convmixer_cifar10.py',
                     'polarization_resnet56_cifar10.py', 'rpg_resnet18_imagenet.py',
                     'rpg_resnet34_imagenet.py']


@pytest.mark.parametrize('name', CONFIGS)
def test_full_scale_config_compiles_reports_memory_and_trains(name):
  path = REPO / 'configs' / 'full' / name
  devices = int(re.search(r'^DEVICES = (\d+)$', path.read_text(), re.M).group(1))
  p = subprocess.run([sys.executable, 'benchmarks/fullscale.py', '--configs', str(path)],
                     cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  line = p.stdout.strip().splitlines()[-1]
  fields = dict(kv.split('=') for kv in line.split()[2:])
  assert line.startswith(f'fullscale {name} ') and int(fields['devices']) == devices, line
  assert float(fields['per_device_mb']) > 10 and float(fields['gflop_per_step']) > 1, line
  assert int(fields['steps']) > 1000 and math.isfinite(float(fields['loss'])), line

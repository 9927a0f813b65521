"""pemn_jax.kernels.cpu_tuning: what configure() does, and that its XLA schedule
shrinks a ConvMixer step's temporaries."""

import os
import subprocess
import sys

from conftest import REPO

PROBE = r'''
import os
from pemn_jax.kernels import cpu_tuning
print('result', cpu_tuning.configure())
print('flags', os.environ.get('XLA_FLAGS', ''))
import jax, jax.numpy as jnp, optax
from pemn_jax import models
model = models.get('convmixer', dim=64, depth=4)
v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
x, y = jnp.zeros((16, 32, 32, 3)), jnp.zeros((16,), jnp.int32)
def loss(p):
  out, _ = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                       mutable=['batch_stats'])
  return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
m = jax.jit(jax.grad(loss)).lower(v['params']).compile().memory_analysis()
print('temp', m.temp_size_in_bytes)
print('again', cpu_tuning.configure())
'''


def probe(**env):
  e = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PEMN_JAX_HOST_MEMORY')}
  e.update(env)
  r = subprocess.run([sys.executable, '-c', PROBE], cwd=REPO, env=e, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return dict(line.split(' ', 1) for line in r.stdout.splitlines())


def test_configure_sets_the_schedule_and_retains_memory_only_when_asked():
  plain = probe(JAX_PLATFORMS='cpu')
  assert "'scheduler': 'memory-minimizing'" in plain['result']
  assert "'host_memory': 'default'" in plain['result']
  assert '--xla_cpu_enable_concurrency_optimized_scheduler=false' in plain['flags']
  assert 'backend already started' in plain['again']
  kept = probe(JAX_PLATFORMS='cpu', PEMN_JAX_HOST_MEMORY='retain')
  assert "'host_memory': 'retained'" in kept['result']
  # The memory-minimizing schedule: a ConvMixer step's temporaries shrink.
  off = probe(JAX_PLATFORMS='cpu', PEMN_JAX_CPU_TUNING='off')
  assert int(plain['temp']) < 0.6 * int(off['temp']), (plain['temp'], off['temp'])


def test_configure_leaves_other_platforms_and_user_flags_alone():
  from pemn_jax.kernels import cpu_tuning
  old = os.environ.get('JAX_PLATFORMS')
  os.environ['JAX_PLATFORMS'] = 'cuda,cpu'
  try:
    assert not cpu_tuning._cpu_only()
  finally:
    if old is None:
      del os.environ['JAX_PLATFORMS']
    else:
      os.environ['JAX_PLATFORMS'] = old
  out = probe(JAX_PLATFORMS='cpu',
              XLA_FLAGS='--xla_cpu_enable_concurrency_optimized_scheduler=true')
  assert "'scheduler': 'set by the user'" in out['result']
  assert out['flags'] == '--xla_cpu_enable_concurrency_optimized_scheduler=true'
  off = probe(JAX_PLATFORMS='cpu', PEMN_JAX_CPU_TUNING='off')
  assert "'disabled'" in off['result'] and off['flags'] == ''

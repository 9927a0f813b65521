"""pemn_jax.kernels.cpu_tuning: what configure() does, and that its XLA schedule
shrinks a ConvMixer step's temporaries."""

import os
import subprocess
import sys

from conftest import REPO

PROBE = r'''
import os, resource
from pemn_jax.kernels import cpu_tuning
given = os.environ.get('PROBE_STEP_BYTES')
try:
  print('result', cpu_tuning.configure(int(given) if given else None))
except ValueError as e:
  print('error', e)
  raise SystemExit(0)
print('flags', os.environ.get('XLA_FLAGS', ''))
import jax, jax.numpy as jnp, optax
print('async', jax.config.values['jax_cpu_enable_async_dispatch'])
if os.environ.get('PROBE_FAULTS'):  # a program whose temporaries are one block of ~220 MB
  def f(x):
    ys = [jnp.cumsum(x * i) for i in range(1, 7)]
    return sum(y[::-1] * y for y in ys).sum()
  x = jnp.ones((1 << 22,), jnp.float32)
  c = jax.jit(f).lower(x).compile()
  print('pages', c.memory_analysis().temp_size_in_bytes // resource.getpagesize())
  jax.block_until_ready(c(x))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    jax.block_until_ready(c(x))
  print('faults', (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
  raise SystemExit(0)
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
  e = {k: v for k, v in os.environ.items()
       if k not in ('XLA_FLAGS', 'PEMN_JAX_HOST_MEMORY', 'JAX_CPU_ENABLE_ASYNC_DISPATCH')}
  e.update(env)
  r = subprocess.run([sys.executable, '-c', PROBE], cwd=REPO, env=e, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return dict(line.split(' ', 1) for line in r.stdout.splitlines())


def test_configure_sets_the_schedule_and_keeps_memory_for_large_steps_only():
  plain = probe(JAX_PLATFORMS='cpu')  # no estimate of the step: nothing kept
  assert "'scheduler': 'memory-minimizing'" in plain['result']
  assert "'host_memory': 'released'" in plain['result'] and plain['async'] == 'True'
  assert '--xla_cpu_enable_concurrency_optimized_scheduler=false' in plain['flags']
  assert 'backend already started' in plain['again']
  # The memory-minimizing schedule: a ConvMixer step's temporaries shrink
  # (measured 48.4 vs 57.9 MB with oneDNN's depthwise convolutions, 48.0 vs 64.0
  # MB with the shifted ones).
  off = probe(JAX_PLATFORMS='cpu', PEMN_JAX_CPU_TUNING='off')
  assert int(plain['temp']) < 0.9 * int(off['temp']), (plain['temp'], off['temp'])
  from pemn_jax.kernels.cpu_tuning import KEEP_ABOVE
  small = probe(JAX_PLATFORMS='cpu', PROBE_STEP_BYTES=str(KEEP_ABOVE), PROBE_FAULTS='1')
  large = probe(JAX_PLATFORMS='cpu', PROBE_STEP_BYTES=str(KEEP_ABOVE + 1), PROBE_FAULTS='1')
  assert "'host_memory': 'released'" in small['result'] and small['async'] == 'True'
  assert "'host_memory': 'kept'" in large['result'] and large['async'] == 'False'
  # Released, every execution faults its ~220 MB of temporaries in afresh; kept, it
  # reuses the last execution's pages.
  pages = int(small['pages'])
  assert pages > 40_000 and int(small['faults']) > 0.8 * pages, small
  assert int(large['faults']) < 0.05 * pages, large
  asked = probe(JAX_PLATFORMS='cpu', PEMN_JAX_HOST_MEMORY='retain')  # keep's former name
  assert "'host_memory': 'kept'" in asked['result'] and asked['async'] == 'False'
  refused = probe(JAX_PLATFORMS='cpu', PEMN_JAX_HOST_MEMORY='release',
                  PROBE_STEP_BYTES=str(10 * KEEP_ABOVE))
  assert "'host_memory': 'released'" in refused['result'] and refused['async'] == 'True'
  bad = probe(JAX_PLATFORMS='cpu', PEMN_JAX_HOST_MEMORY='retian')
  assert "PEMN_JAX_HOST_MEMORY='retian'" in bad['error'] and 'keep' in bad['error'], bad


ESTIMATE = r'''
from pemn_jax.config import base_config
from pemn_jax.kernels import cpu_tuning
from pemn_jax.train.run import activation_bytes
for model, dataset in (('mlp', 'fashion_mnist'), ('resnet20', 'cifar10'), ('nope', 'cifar10')):
  c = base_config()
  c.model, c.dataset, c.batch_size = model, dataset, 128
  if model == 'mlp':
    c.model_kwargs.hidden = (300, 100)
  print(model, activation_bytes(c))
print('started', cpu_tuning._backend_started())
'''


def test_activation_bytes_estimates_a_step_without_starting_the_backend():
  r = subprocess.run([sys.executable, '-c', ESTIMATE], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 0, r.stderr[-2000:]
  out = dict(line.split(' ', 1) for line in r.stdout.splitlines())
  from pemn_jax.kernels.cpu_tuning import KEEP_ABOVE
  # The MLP's layer outputs alone (784 inputs, 300 + 100 + 10 units, their
  # activations) are 128 x 4 x (784 + 2*300 + 2*100 + 10) bytes; its elementwise
  # ops add a few more.
  layers = 128 * 4 * (784 + 2 * 300 + 2 * 100 + 10)
  assert layers <= int(out['mlp']) <= 4 * layers < KEEP_ABOVE, out
  # ResNet-20 on CIFAR: its 3x3 convolutions' outputs alone, per example 7 maps of
  # 32x32x16, 6 of 16x16x32 and 6 of 8x8x64 floats.
  convs = 128 * 4 * (7 * 32 * 32 * 16 + 6 * 16 * 16 * 32 + 6 * 8 * 8 * 64)
  assert int(out['resnet20']) > convs > KEEP_ABOVE, out
  assert out['nope'] == 'None'  # an unknown model: no estimate (the run reports it)
  assert out['started'] == 'False'


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

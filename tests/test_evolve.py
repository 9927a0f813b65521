"""Directed evolution: the search, the quantizers, the bit search, the encoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import minimal_header, tiny_config, tree_equal

from pemn_jax import models
from pemn_jax.evolve import quantize as Q
from pemn_jax.evolve import search as S
from pemn_jax.export import artifact, codecs
from pemn_jax.pytrees import flatten


@pytest.fixture(scope='module')
def small():
  model = models.get('mlp', hidden=(32, 16))
  v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  images = jax.random.normal(jax.random.key(1), (64, 28, 28, 1))
  return model, v['params'], images


def test_population_in_one_vmapped_call_equals_candidates_one_by_one(small):
  model, params, images = small
  evo = S.Evolution(model, {}, images, params, population=8)
  path = 'Dense_1/kernel'
  w = flatten(params)[path]
  alive = jnp.ones(w.size, bool).at[:100].set(False)
  keys = jax.random.split(jax.random.key(3), 8)
  zero_sets, kls = evo.population_fn(path, w.shape)(params, alive, keys, jnp.int32(20))
  zero_sets, kls = np.asarray(zero_sets), np.asarray(kls)
  one = evo.candidate_kl(path, w.shape)
  for z, kl in zip(zero_sets, kls):
    assert z.sum() == 20 and not z[:100].any()  # exactly k, only alive weights
    by_hand = float(one(params, jnp.where(jnp.asarray(z), 0.0, w.reshape(-1))))
    assert by_hand == pytest.approx(float(kl), rel=1e-5, abs=1e-7)
  assert len({z.tobytes() for z in zero_sets}) == 8  # distinct candidates
  # Magnitude bias: the candidates' zeroed weights are smaller than average.
  assert np.abs(np.asarray(w).reshape(-1))[zero_sets.any(0)].mean() < np.abs(
      np.asarray(w)).mean()


def test_generations_meet_the_target_exactly_and_zeros_stay_zero(small):
  model, params, images = small
  evo = S.Evolution(model, {}, images, params, population=4, tolerance=1.0)  # groups grow
  path = 'Dense_0/kernel'
  masks = {path: np.ones(flatten(params)[path].shape, bool)}
  want, rate, kl, seen = 500, 0.25, 0.0, None
  p = params
  for g in range(200):
    if masks[path].sum() == want:
      break
    p, masks, rate, kl, info = evo.generation(p, masks, path, want, rate, jax.random.key(g), kl)
    zero_now = ~masks[path]
    if seen is not None:
      assert (zero_now | ~seen).all()  # once zeroed, always zeroed
    seen = zero_now
    assert np.all(np.asarray(flatten(p)[path])[zero_now] == 0)
  assert masks[path].sum() == want
  # Distillation keeps them at zero too.
  batches = [jax.random.normal(jax.random.key(i), (16, 28, 28, 1)) for i in range(5)]
  p2 = S.Distiller(model, {}, params, lr=1e-2)(p, masks, batches)
  assert np.all(np.asarray(flatten(p2)[path])[~masks[path]] == 0)
  assert not np.array_equal(np.asarray(flatten(p2)['Dense_1/kernel']),
                            np.asarray(flatten(p)['Dense_1/kernel']))


@pytest.mark.parametrize('method', Q.METHODS)
@pytest.mark.parametrize('bits', [2, 3, 8])
def test_quantizers_and_the_quant_section_roundtrip(method, bits, tmp_path):
  rng = np.random.default_rng(bits)
  w = rng.normal(size=(40, 30)).astype(np.float32)
  w[rng.random(w.shape) < 0.8] = 0
  q = Q.quantize(w, bits, method)
  assert len(q.codebook) == 2 ** bits and q.nnz == int((w != 0).sum())
  d = q.dense()
  assert np.all(d[w == 0] == 0) and set(np.unique(d[w != 0])) <= set(q.codebook)
  # The nearest level: no other level is closer to any weight.
  err = np.abs(d[w != 0] - w[w != 0])
  assert np.all(err <= np.abs(w[w != 0][:, None] - q.codebook[None]).min(1) + 1e-7)
  path = str(tmp_path / 'q.pemn')
  artifact.write(path, minimal_header(), {'params/w': q, 'params/b': np.ones(3, np.float32)})
  header, arrays = artifact.read(path)
  np.testing.assert_array_equal(arrays['params/w'], d)  # bit-exact
  sec = next(s for s in header['sections'] if s['name'] == 'params/w')
  assert sec['codec'] == 'quant' and sec['bits'] == bits and sec['method'] == method


def test_kmeans_beats_uniform_on_gaussian_weights():
  w = np.random.default_rng(0).normal(size=5000).astype(np.float32)
  mse = {m: float(np.mean((Q.quantize(w, 3, m).dense() - w) ** 2)) for m in ('uniform', 'kmeans')}
  assert mse['kmeans'] < mse['uniform']


def test_bit_search_respects_its_budget():
  rng = np.random.default_rng(0)
  weights = {'a': rng.normal(size=(50, 40)).astype(np.float32),
             'b': rng.normal(size=(40, 10)).astype(np.float32)}

  def fitness(layers):  # squared error of the quantized weights
    return sum(float(np.sum((layers.get(k, v) - v) ** 2)) for k, v in weights.items())
  for budget in (2.0, 5.0, 50.0):  # >= the 8-bit error (1.49): feasible
    alloc = Q.allocate_bits(weights, fitness, budget)
    assert alloc.fitness <= budget
    assert fitness({k: q.dense() for k, q in alloc.layers.items()}) == pytest.approx(alloc.fitness)
  loose = Q.allocate_bits(weights, fitness, 1e9)
  assert all(q.bits == 2 for q in loose.layers.values())  # nothing stops it
  tight = Q.allocate_bits(weights, fitness, 0.0)
  assert all(q.bits == 8 for q in tight.layers.values())


def test_rans_symbols_reach_the_entropy():
  rng = np.random.default_rng(0)
  p = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125])
  s = rng.choice(6, 20_000, p=p)
  counts = np.bincount(s, minlength=6)
  blob = codecs.rans_encode_symbols(s, counts)
  np.testing.assert_array_equal(codecs.rans_decode_symbols(blob, s.size, counts), s)
  h = -np.sum(counts / s.size * np.log2(counts / s.size)) * s.size
  assert 8 * len(blob) <= 1.01 * h + 32 * codecs.rans_streams(s.size) + 16
  with pytest.raises(ValueError, match='corrupt|counts|truncated'):
    codecs.rans_decode_symbols(blob[:-2] + b'\0\0', s.size, counts)


@pytest.fixture(scope='module')
def teacher_run(mnist_slice, tmp_path_factory):
  """A tiny trained run; tests evolve copies of it (their searches apart)."""
  from pemn_jax.train.loop import train_and_evaluate
  run = str(tmp_path_factory.mktemp('teacher') / 'run')
  train_and_evaluate(tiny_config(mnist_slice, num_steps=24), run)
  return run


def test_evolve_cli_writes_a_file_that_decodes_to_the_evaluated_params(teacher_run, tmp_path):
  import shutil

  from pemn_jax.evolve.compress import evolve
  from pemn_jax.export.model_file import load
  shutil.copytree(teacher_run, tmp_path / 'run')
  out = evolve(str(tmp_path / 'run'), str(tmp_path / 'de.pemn'), sparsity=0.8, population=4,
               calibration=64, finetune_steps=5, say=lambda *_: None)
  assert out['finished'] and out['sparsity'] == pytest.approx(0.8, abs=0.01)
  header, _, params, _ = load(str(tmp_path / 'de.pemn'))
  assert tree_equal(params, out['params'])  # exactly the quantized params that were evaluated
  assert any(s['codec'] == 'quant' for s in header['sections'])
  for p, s in out['layer_sparsity'].items():  # per-layer targets, exactly
    n = int(np.prod(flatten(params)[p].shape))
    assert int((np.asarray(flatten(params)[p]) != 0).sum()) <= n - int(s * n) + 0


def test_fine_tuning_between_generations_and_a_rerun_with_other_settings(teacher_run, tmp_path):
  """--generation_finetune distills after every generation (zeros stay zero,
  the steps are counted); a baseline's --extra_finetune adds to its end; a
  rerun with other settings is refused, leaving the saved search as it was."""
  import os
  import shutil

  from pemn_jax.evolve.compress import evolve
  run = str(tmp_path / 'run')
  shutil.copytree(teacher_run, run)
  kw = dict(sparsity=0.8, population=4, calibration=64, finetune_steps=3, say=lambda *_: None)
  out = evolve(run, str(tmp_path / 'a.pemn'), generation_finetune=2, **kw)
  layers = len(out['layer_sparsity'])
  assert out['generations'] > 0
  assert out['distill_steps'] == 3 * (layers + 1) + 2 * out['generations']
  assert out['generation_distill_steps'] == 2 * out['generations']
  for p, s in out['layer_sparsity'].items():
    w = np.asarray(flatten(out['params'])[p])
    assert int((w != 0).sum()) <= w.size - int(s * w.size)
  state = os.path.join(run, 'evolve', 'de-s0.8', 'checkpoints')
  before = sorted(os.listdir(state))
  with pytest.raises(ValueError, match=r'population: saved 4, now 8.*left untouched'):
    evolve(run, str(tmp_path / 'b.pemn'), **{**kw, 'population': 8}, generation_finetune=2)
  assert sorted(os.listdir(state)) == before and not os.path.exists(tmp_path / 'b.pemn')
  mag = evolve(run, str(tmp_path / 'm.pemn'), method='magnitude', extra_finetune=7, **kw)
  assert mag['generations'] == 0 and mag['distill_steps'] == 3 * (layers + 1) + 7

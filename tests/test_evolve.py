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


def test_varints_and_unused_levels(tmp_path):
  """Symbol counts are varints (exact over the u32 range, refused past it);
  levels no weight uses are not stored, and the file decodes the same."""
  values = [0, 1, 127, 128, 300, 16383, 16384, 2**32 - 1]
  blob = codecs.encode_varints(values)
  assert len(blob) == 1 + 1 + 1 + 2 + 2 + 2 + 3 + 5
  np.testing.assert_array_equal(codecs.decode_varints(blob, len(values)), values)
  for bad in (blob[:-1], blob + b'\0'):
    with pytest.raises(ValueError, match='varints'):
      codecs.decode_varints(bad, len(values))
  with pytest.raises(ValueError, match='out of range'):
    codecs.encode_varints([2**32])
  w = np.zeros((10, 10), np.float32)
  w[0, :6] = [-1, -1, 2, 2, 2, 5]
  codebook = np.linspace(-1, 6.5, 16).astype(np.float32)  # levels 0, 6 and 12 used
  q = codecs.Quantized(w != 0, Q.assign(w[w != 0], codebook), codebook, 'uniform', 4)
  path = str(tmp_path / 'u.pemn')
  artifact.write(path, minimal_header(), {'params/w': q})
  header, arrays = artifact.read(path)
  assert header['sections'][0]['levels'] == 3 and header['sections'][0]['bits'] == 4
  np.testing.assert_array_equal(arrays['params/w'], q.dense())
  assert set(np.unique(q.dense()[w != 0])) == {-1.0, 2.0, 5.0}


def test_codebook_tuning_moves_only_levels_and_lowers_the_divergence(small):
  """Trained quantization: positions and symbols stay, every kept weight
  still equals its symbol's level, and the KL to the teacher (computed here
  from the model's outputs) falls on the batches it was tuned on."""
  model, params, _ = small
  teacher = jax.tree.map(lambda x: x * 1.0, params)
  flat = flatten(params)
  rng = np.random.default_rng(0)
  student = {}
  for p, v in flat.items():  # a pruned copy, every leaf at 2 bits
    w = np.asarray(v).copy()
    if p.endswith('kernel'):
      w[rng.random(w.shape) < 0.5] = 0
    student[p] = Q.quantize(w, 2, 'kmeans')
  batches = [jax.random.normal(jax.random.key(10 + i), (32, 28, 28, 1)) for i in range(40)]

  def kl(qs):
    from pemn_jax.pytrees import unflatten
    p = unflatten({k: jnp.asarray(q.dense()) for k, q in qs.items()})
    x = jnp.concatenate(batches)
    t = jax.nn.log_softmax(model.apply({'params': teacher}, x))
    s = jax.nn.log_softmax(model.apply({'params': p}, x))
    return float(jnp.mean(jnp.sum(jnp.exp(t) * (t - s), -1)))
  tuner = S.CodebookTuner(model, {}, teacher, lr=1e-2)
  tuned = tuner(params, student, batches)
  assert set(tuned) == set(student)
  for p, q in student.items():
    t = tuned[p]
    np.testing.assert_array_equal(t.mask, q.mask)
    np.testing.assert_array_equal(t.symbols, q.symbols)
    assert (t.bits, t.method, t.codebook.shape) == (q.bits, q.method, q.codebook.shape)
    d = t.dense()
    assert np.all(d[~q.mask] == 0) and np.array_equal(d[q.mask], t.codebook[q.symbols])
  assert any(not np.array_equal(tuned[p].codebook, q.codebook) for p, q in student.items())
  assert kl(tuned) < 0.8 * kl(student)


def test_codebook_gradient_is_a_per_level_sum_without_a_scatter():
  """The level lookup's gradient equals the weighted symbol histogram (numpy
  bincount), and its TPU program holds no scatter (a plain gather's
  gradient is a 235,200-update scatter-add there)."""
  from pemn_jax import lowering
  rng = np.random.default_rng(0)
  sym = jnp.asarray(rng.integers(0, 16, (784, 300)), jnp.int32)
  g = rng.normal(size=(784, 300)).astype(np.float32)
  cb = jnp.linspace(-1.0, 1.0, 16)

  def f(c):
    return jnp.sum(S.codebook_lookup(c, sym) * g)
  want = np.bincount(np.asarray(sym).ravel(), weights=g.ravel(), minlength=16)
  np.testing.assert_allclose(np.asarray(jax.grad(f)(cb)), want, rtol=1e-4, atol=1e-3)
  counts = lowering.census(lowering.lower(jax.grad(f), (cb,), ('tpu',)))
  assert counts['scatters'] == [] and lowering.problems(counts) == []
  plain = lowering.census(lowering.lower(jax.grad(lambda c: jnp.sum(c[sym] * g)), (cb,), ('tpu',)))
  assert lowering.problems(plain)  # (the check can fail: the plain gather's gradient does)


def test_layer_targets_with_fixed_densities(small):
  from pemn_jax.evolve.compress import layer_targets
  from pemn_jax.ops.topk import num_kept
  _, params, _ = small
  order = ['Dense_0/kernel', 'Dense_1/kernel', 'Dense_2/kernel']
  sizes = {p: int(np.prod(flatten(params)[p].shape)) for p in order}  # 25088, 512, 160
  erk = layer_targets(params, order, 0.9)
  t = layer_targets(params, order, 0.9, {'Dense_1/kernel': 0.5, 'Dense_2/kernel': 1.0})
  assert list(t) == order and t['Dense_1/kernel'] == 256 and t['Dense_2/kernel'] == 160
  # The rest of the budget goes to the only free kernel: 10% of all, less the fixed ones.
  want = 0.1 * sum(sizes.values()) - 256 - 160
  assert t['Dense_0/kernel'] == num_kept(sizes['Dense_0/kernel'], want / sizes['Dense_0/kernel'])
  assert t != erk and sum(t.values()) == pytest.approx(sum(erk.values()), abs=3)
  for bad, msg in [({'Dense_9/kernel': 0.5}, 'not kernels of this model'),
                   ({'Dense_1/kernel': 0.0}, r'in \(0, 1\]'),
                   ({'Dense_0/kernel': 0.5}, 'lower them')]:
    with pytest.raises(ValueError, match=msg):
      layer_targets(params, order, 0.9, bad)


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
  # Kernels and leftovers (biases, at the default 4 bits) are all quantized.
  params_sections = [s for s in header['sections'] if s['name'].startswith('params/')]
  assert params_sections and all(s['codec'] == 'quant' for s in params_sections)
  assert all(s['bits'] == 4 for s in params_sections if s['name'].endswith('bias'))
  # The CLI's closing table: a row per pruned kernel with its sparsity (as
  # the file's params have it), its bits and its section's bytes.
  from pemn_jax.evolve.__main__ import layer_table
  rows = layer_table(out, header['sections']).splitlines()
  assert rows[0].split() == ['layer', 'sparsity', 'bits', 'method', 'bytes']
  by_name = {s['name']: s for s in params_sections}
  assert len(rows) == 1 + len(out['layer_sparsity']) >= 3
  for row in rows[1:]:
    path, sparsity, bits, _, size = row.split()
    w = np.asarray(flatten(params)[path])
    assert float(sparsity) == pytest.approx((w == 0).mean(), abs=1e-4)
    assert int(bits) == by_name[f'params/{path}']['bits']
    assert int(size.replace(',', '')) == by_name[f'params/{path}']['length']
  # A budget nothing meets (below the float student's own KL): quantizing the
  # biases alone breaks it, so they stay float32.
  evolve(str(tmp_path / 'run'), str(tmp_path / 'z.pemn'), sparsity=0.8, population=4,
         calibration=64, finetune_steps=5, say=lambda *_: None, budget_kl=-1.0)
  header = artifact.read(str(tmp_path / 'z.pemn'))[0]
  biases = [s for s in header['sections'] if s['name'].endswith('bias')]
  assert biases and all(s['codec'] == 'f32' for s in biases)
  for p, s in out['layer_sparsity'].items():  # per-layer targets, exactly
    n = int(np.prod(flatten(params)[p].shape))
    assert int((np.asarray(flatten(params)[p]) != 0).sum()) <= n - int(s * n) + 0


def test_fine_tuning_between_generations_and_a_rerun_with_other_settings(teacher_run, tmp_path,
                                                                          monkeypatch):
  """--generation_finetune distills after every generation (zeros stay zero,
  the steps are counted); a baseline's --extra_finetune adds to its end; a
  rerun with other settings is refused, leaving the saved search as it was.
  Each phase after the pruning is announced, with an ETA line as it runs."""
  import functools
  import os
  import shutil

  from pemn_jax import cli
  from pemn_jax.evolve import compress
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
  lines = []
  monkeypatch.setattr(compress, 'Eta', functools.partial(cli.Eta, every=0.0))  # every step
  mag = evolve(run, str(tmp_path / 'm.pemn'), method='magnitude', extra_finetune=7,
               quant_finetune=6, **{**kw, 'say': lines.append})
  assert mag['generations'] == 0 and mag['distill_steps'] == 3 * (layers + 1) + 7
  steps = 3 * (layers + 1) + 7
  order = [f'fine-tuning the pruned student: {steps} distillation steps',
           f'fine-tuning: 1/{steps} steps', f'fine-tuning: {steps - 1}/{steps} steps',
           'quantizing: bits per layer (2-8) within a 0.01 KL budget', 'bits chosen in ',
           'tuning the codebooks: 6 distillation steps', 'codebooks: 5/6 steps', 'encoding: ']
  at = [next((i for i, line in enumerate(lines) if line.startswith(o)), None) for o in order]
  assert None not in at and at == sorted(at), lines
  chosen = next(line for line in lines if line.startswith('bits chosen in '))
  assert all(f'{p} {b}' in chosen for p, (b, _) in mag['bits'].items()), (chosen, mag['bits'])

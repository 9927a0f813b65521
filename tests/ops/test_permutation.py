import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax.ops import permute_indices, permute_segments
from pemn_jax.ops.segments import Segments


def permutation(n, seed, leaf=0):
  """The whole permutation [pi(0), ..., pi(n-1)]."""
  return permute_indices(jnp.arange(n, dtype=jnp.uint32), n, seed, leaf)

SIZES = [1, 2, 3, 5, 7, 13, 97, 257, 65537, 4, 8, 64, 1024, 65536, 1_000_003, 2**20]


@pytest.mark.parametrize('n', SIZES)
def test_permutation_is_bijection(n):
  p = np.asarray(permutation(n, seed=1234, leaf='Conv_0/kernel'))
  assert p.dtype == np.uint32 and p.shape == (n,)
  np.testing.assert_array_equal(np.sort(p), np.arange(n))


def test_permutation_depends_on_seed_and_leaf_and_is_deterministic():
  n = 4099
  a = np.asarray(permutation(n, 1, 'a'))
  np.testing.assert_array_equal(a, np.asarray(permutation(n, 1, 'a')))
  assert (a != np.asarray(permutation(n, 2, 'a'))).mean() > 0.9
  assert (a != np.asarray(permutation(n, 1, 'b'))).mean() > 0.9
  assert (a != np.arange(n)).mean() > 0.9  # not the identity


def test_permutation_looks_random():
  # Displacement of a uniform random permutation: E|pi(j) - j| = (n^2 - 1) / (3n).
  n = 100_000
  p = np.asarray(permutation(n, 7, 'x')).astype(np.int64)
  disp = np.abs(p - np.arange(n)).mean()
  assert abs(disp / ((n * n - 1) / (3 * n)) - 1) < 0.02
  # Neighbouring inputs land far apart.
  assert np.abs(np.diff(p)).mean() > n / 5


def test_traced_seed_equals_python_seed():
  f = jax.jit(lambda s: permutation(1000, s, 'k'))
  np.testing.assert_array_equal(np.asarray(f(jnp.uint32(9))), np.asarray(permutation(1000, 9, 'k')))


def test_partial_evaluation_matches_full():
  n = 5000
  full = np.asarray(permutation(n, 3, 'z'))
  j = np.array([0, 17, 4999, 2500])
  np.testing.assert_array_equal(np.asarray(permute_indices(j, n, 3, 'z')), full[j])


def test_segments_match_single_permutations():
  sizes = [1, 2, 3, 7, 8, 1000, 4097]
  names = [f'l{i}/kernel' for i in range(len(sizes))]
  seg = Segments(sizes)
  flat = np.asarray(permute_segments(seg, names, 11))
  for start, n, name in zip(seg.starts, seg.sizes, names, strict=True):
    np.testing.assert_array_equal(flat[start:start + n], np.asarray(permutation(int(n), 11, name)))


def test_bad_domain():
  with pytest.raises(ValueError, match='domain'):
    permute_indices(jnp.arange(1, dtype=jnp.uint32), 0, 1)

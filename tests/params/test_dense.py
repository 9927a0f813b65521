import jax
import numpy as np
from conftest import tiny_target, tree_equal

from pemn_jax.params import Dense
from pemn_jax.params.base import init_leaves
from pemn_jax.pytrees import flatten


def test_dense_is_identity_and_inits_by_leaf_name():
  target = tiny_target({'c/kernel': (3, 3, 4, 8), 'c/bias': (8,), 'bn/scale': (8,),
                        'pos_embedding': (1, 5, 8)})
  d = Dense(target)
  state = d.init(jax.random.key(0))
  assert tree_equal(d.materialize(state), state)
  flat = flatten(state)
  np.testing.assert_array_equal(np.asarray(flat['c/bias']), 0)
  np.testing.assert_array_equal(np.asarray(flat['bn/scale']), 1)
  assert abs(float(np.std(np.asarray(flat['pos_embedding']))) - 0.02) < 0.01
  assert d.num_trainable() == d.num_params == 3 * 3 * 4 * 8 + 8 + 8 + 40
  assert d.storage_bits() == {'floats': 32 * d.num_params}


def test_init_leaf_kernel_std():
  x = init_leaves({'k/kernel': jax.ShapeDtypeStruct((100, 200), np.float32)},
                  jax.random.key(0), gain=2.0)['k/kernel']
  assert abs(float(np.std(np.asarray(x))) / np.sqrt(2 / 100) - 1) < 0.03

"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import models


def tiny_target(shapes: dict[str, tuple[int, ...]]):
  """A params target from ``{'Layer/kernel': shape}`` (ShapeDtypeStructs)."""
  from pemn_jax.params.base import unflatten
  return unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})


@pytest.fixture
def mlp_target():
  m = models.get('mlp', hidden=(24, 16))
  return models.abstract_params(m, (6, 6, 1))


def tree_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))

"""Gates in models, and the structure that says what each gate removes.

A model built with ``gates=True`` multiplies chosen activations by ``gate``
params (initialized to ones: the identity). The polarization parameterization
(``pemn_jax.gating.param``) turns them into 0/1 gates; ``pemn_jax.gating.surgery``
removes what closed gates switch off. Both read the model's ``GateStructure``:

* for every gated param leaf (and batch-statistics leaf), which axis each gate
  indexes (``Factor``), or that a gate switches the whole leaf (``axis=None``);
* block gates are *effective* gates: a residual branch is open only if its gate
  is open and at least one of its inner gates is (``any_of``), so closing all
  inner channels equals closing the branch and slicing stays exact (a branch
  with no channels would otherwise still add a constant bias).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import linen as nn


class Gate(nn.Module):
  """``x * gate``: a (C,) gate over the last axis, or a (1,) gate of a branch."""
  scalar: bool = False

  @nn.compact
  def __call__(self, x, any_of=None):
    g = self.param('gate', nn.initializers.ones, (1,) if self.scalar else (x.shape[-1],))
    if any_of is not None:  # a branch is open only if one of its inner gates is
      g = g * jnp.max(any_of)
    return x * g.astype(x.dtype)


def gate_of(module: nn.Module, name: str):
  """The gate vector of child ``name`` (after it was called)."""
  return module.variables['params'][name]['gate']


@dataclasses.dataclass(frozen=True)
class Factor:
  """Gate ``gate`` indexes ``axis`` of a leaf: element i of that axis is kept iff
  ``g[(i // repeat) % len(g)]`` is open; ``axis=None``: the whole leaf."""
  gate: str
  axis: int | None
  repeat: int = 1

  def expand(self, g, n: int):
    """The gate's values along an axis of length n."""
    return g[(np.arange(n) // self.repeat) % g.shape[0]]


@dataclasses.dataclass
class GateStructure:
  """What the gates of a model remove.

  Attributes:
    gates: gate leaf path -> ``'channel'`` or ``'branch'``.
    any_of: branch gate path -> the inner gate whose any-open it requires.
    leaves: param or batch-stat leaf path (without the collection) -> factors.
    rebuild: (open masks by gate path) -> the sliced model's kwargs; raises
      ValueError when the gates cut every path from input to output.
  """
  gates: dict[str, str]
  any_of: dict[str, str]
  leaves: dict[str, list[Factor]]
  rebuild: object

  def effective(self, values: dict) -> dict:
    """Gate values with branch gates multiplied by their inner gates' max."""
    out = dict(values)
    for b, inner in self.any_of.items():
      out[b] = values[b] * jnp.max(values[inner])
    return out


def _check_open(name: str, count: int, what: str):
  if count <= 0:
    raise ValueError(f'the gates close every {what} of {name}: no path from the input to the '
                     'output would remain; lower the target sparsity')

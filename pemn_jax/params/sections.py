"""How a model file names its sections: the one home of the naming contract.

A parameterization's ``export`` returns ``{section name: array}``; names are
'/'-joined paths whose first component says what the array is:

* ``params/<leaf path>``: an ordinary float leaf (``dense``);
* ``rest/<leaf path>``: a leaf a generating method trains as-is (norm scales,
  biases: ``rest='train'``);
* ``mask/<leaf path>``: a boolean mask of a leaf (edge-popup / supermask
  masks, polarization gates) -- stored bit-packed or rANS-coded;
* ``source/<name>``: a section of the parameterization it is composed over
  (nested: ``source/source/...``);
* ``model_state/<collection>/<path>``: batch statistics and other
  non-param collections (added by the exporter);
* anything else (``ring``, ``prototype``): a method's own float arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

PARAMS, REST, MASK, SOURCE, MODEL_STATE = 'params', 'rest', 'mask', 'source', 'model_state'


def nest(prefix: str, arrays: Mapping) -> dict:
  """``arrays`` under ``prefix/``."""
  return {f'{prefix}/{k}': v for k, v in arrays.items()}


def part(prefix: str, arrays: Mapping) -> dict:
  """The arrays under ``prefix/``, with the prefix removed (``nest``'s inverse)."""
  head = prefix + '/'
  return {k[len(head):]: v for k, v in arrays.items() if k.startswith(head)}


def is_mask(name: str) -> bool:
  """Whether section ``name`` holds a boolean mask (``mask/...``, possibly
  inside ``source/`` sections)."""
  while name.startswith(SOURCE + '/'):
    name = name[len(SOURCE) + 1:]
  return name.startswith(MASK + '/')

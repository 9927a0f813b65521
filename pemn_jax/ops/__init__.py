"""Stateless operations: hashing, permutations, top-k masks."""

from pemn_jax.ops.hashing import as_seed, lowbias32, mix, path_id, random_signs
from pemn_jax.ops.permutation import permutation, permute_indices
from pemn_jax.ops.topk import edge_popup_mask, num_kept, straight_through, topk_mask

__all__ = [
    'as_seed', 'edge_popup_mask', 'lowbias32', 'mix', 'num_kept', 'path_id',
    'permutation', 'permute_indices', 'random_signs', 'straight_through', 'topk_mask',
]

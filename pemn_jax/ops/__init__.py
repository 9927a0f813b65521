"""Seed-derived generation ops, stateless: hashing, permutations, top-k
masks, segment bookkeeping, per-device generation."""

from pemn_jax.ops.hashing import as_seed, lowbias32, mix, path_id
from pemn_jax.ops.permutation import permute_indices, permute_segments
from pemn_jax.ops.topk import num_kept, straight_through, topk_mask

__all__ = ['as_seed', 'lowbias32', 'mix', 'num_kept', 'path_id', 'permute_indices',
           'permute_segments', 'straight_through', 'topk_mask']

"""A small Vision Transformer for 32x32 inputs (patch 4: 64 tokens + [cls]).

Attention uses plain 2-D Dense kernels (qkv and output projections) so every
weight leaf has an unambiguous fan-in. ``gates=True`` gates the attention
heads, the MLP hidden units and both residual branches of every block;
``heads``/``mlp_dims`` (per block; 0 = branch removed) describe a sliced
network. The residual stream (``dim``) is not gated: every block reads and
writes all of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn

from pemn_jax.gating.modules import Factor, Gate, GateStructure, gate_of
from pemn_jax.models.layers import Conv, he_normal

lecun = nn.initializers.lecun_normal()


class SelfAttention(nn.Module):
  num_heads: int
  head_dim: int
  gates: bool = False

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h, dh = self.num_heads, self.head_dim
    qkv = nn.Dense(3 * h * dh, kernel_init=lecun, name='qkv')(x).reshape(b, t, 3, h, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(dh).astype(x.dtype)
    att = nn.softmax(att, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', att, v)
    if self.gates:  # one gate per head
      y = Gate(name='Gate_0')(y.swapaxes(-1, -2)).swapaxes(-1, -2)
    return nn.Dense(d, kernel_init=lecun, name='out')(y.reshape(b, t, h * dh))


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  head_dim: int
  gates: bool = False

  @nn.compact
  def __call__(self, x):
    if self.num_heads > 0:
      attn = SelfAttention(self.num_heads, self.head_dim, self.gates, name='SelfAttention_0')
      y = attn(nn.LayerNorm(name='LayerNorm_0')(x))
      if self.gates:
        y = Gate(scalar=True, name='Gate_0')(y, any_of=attn.variables['params']['Gate_0']['gate'])
      x = x + y
    if self.mlp_dim > 0:
      y = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=lecun, name='Dense_0')(
          nn.LayerNorm(name='LayerNorm_1')(x)), approximate=False)
      if self.gates:
        y = Gate(name='Gate_1')(y)
      y = nn.Dense(x.shape[-1], kernel_init=lecun, name='Dense_1')(y)
      if self.gates:
        y = Gate(scalar=True, name='Gate_2')(y, any_of=gate_of(self, 'Gate_1'))
      x = x + y
    return x


class ViT(nn.Module):
  patch_size: int = 4
  dim: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 384
  num_classes: int = 10
  gates: bool = False
  heads: Sequence[int] | None = None      # per block (a sliced network)
  mlp_dims: Sequence[int] | None = None   # per block (a sliced network)

  def block_dims(self):
    heads = self.heads or (self.num_heads,) * self.depth
    mlps = self.mlp_dims or (self.mlp_dim,) * self.depth
    return [(f'EncoderBlock_{i}', int(heads[i]), int(mlps[i])) for i in range(self.depth)]

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'ViT input {x.shape[1:3]} is not divisible by patch size {p}')
    x = Conv(self.dim, (p, p), (p, p), padding='VALID', kernel_init=he_normal, name='embed')(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.dim)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(x.dtype), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    x = x + pos.astype(x.dtype)
    for name, h, m in self.block_dims():
      x = EncoderBlock(h, m, self.dim // self.num_heads, self.gates, name=name)(x)
    x = nn.LayerNorm(name='LayerNorm_0')(x[:, 0])
    return nn.Dense(self.num_classes, kernel_init=he_normal, name='head')(x)

  def gate_structure(self) -> GateStructure:
    dh = self.dim // self.num_heads
    gates, any_of, leaves = {}, {}, {}
    for name, h, m in self.block_dims():
      add = lambda path, f, name=name: leaves.setdefault(f'{name}/{path}', []).append(f)  # noqa
      if h > 0:
        head, branch = f'{name}/SelfAttention_0/Gate_0/gate', f'{name}/Gate_0/gate'
        gates[head], gates[branch], any_of[branch] = 'channel', 'branch', head
        # qkv columns are (3, heads, head_dim) flattened; out rows (heads, head_dim).
        add('SelfAttention_0/qkv/kernel', Factor(head, 1, dh))
        add('SelfAttention_0/qkv/bias', Factor(head, 0, dh))
        add('SelfAttention_0/out/kernel', Factor(head, 0, dh))
        for path in ('LayerNorm_0/scale', 'LayerNorm_0/bias', 'SelfAttention_0/qkv/kernel',
                     'SelfAttention_0/qkv/bias', 'SelfAttention_0/out/kernel',
                     'SelfAttention_0/out/bias'):
          add(path, Factor(branch, None))
      if m > 0:
        unit, branch = f'{name}/Gate_1/gate', f'{name}/Gate_2/gate'
        gates[unit], gates[branch], any_of[branch] = 'channel', 'branch', unit
        add('Dense_0/kernel', Factor(unit, 1))
        add('Dense_0/bias', Factor(unit, 0))
        add('Dense_1/kernel', Factor(unit, 0))
        for path in ('LayerNorm_1/scale', 'LayerNorm_1/bias', 'Dense_0/kernel', 'Dense_0/bias',
                     'Dense_1/kernel', 'Dense_1/bias'):
          add(path, Factor(branch, None))

    def rebuild(open_):
      heads, mlps = [], []
      for name, h, m in self.block_dims():
        on = lambda g: bool(open_[g][0])  # noqa: E731
        heads.append(int(open_[f'{name}/SelfAttention_0/Gate_0/gate'].sum())
                     if h and on(f'{name}/Gate_0/gate') else 0)
        mlps.append(int(open_[f'{name}/Gate_1/gate'].sum()) if m and on(f'{name}/Gate_2/gate')
                    else 0)
      return {'heads': tuple(heads), 'mlp_dims': tuple(mlps), 'gates': False}
    return GateStructure(gates, any_of, leaves, rebuild)

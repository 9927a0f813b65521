"""A small Vision Transformer for 32x32 inputs (patch 4: 64 tokens + [cls]).

Attention uses plain 2-D Dense kernels (qkv and output projections) so every
weight leaf has an unambiguous fan-in.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from pemn_jax.models.layers import he_normal

lecun = nn.initializers.lecun_normal()


class SelfAttention(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = self.num_heads
    qkv = nn.Dense(3 * d, kernel_init=lecun, name='qkv')(x).reshape(b, t, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(d // h).astype(x.dtype)
    att = nn.softmax(att, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, t, d)
    return nn.Dense(d, kernel_init=lecun, name='out')(y)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    x = x + SelfAttention(self.num_heads)(nn.LayerNorm()(x))
    y = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=lecun)(nn.LayerNorm()(x)), approximate=False)
    return x + nn.Dense(x.shape[-1], kernel_init=lecun)(y)


class ViT(nn.Module):
  patch_size: int = 4
  dim: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 384
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'ViT input {x.shape[1:3]} is not divisible by patch size {p}')
    x = nn.Conv(self.dim, (p, p), (p, p), padding='VALID', kernel_init=he_normal, name='embed')(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.dim)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(x.dtype), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    x = x + pos.astype(x.dtype)
    for _ in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim)(x)
    x = nn.LayerNorm()(x[:, 0])
    return nn.Dense(self.num_classes, kernel_init=he_normal, name='head')(x)

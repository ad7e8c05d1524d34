"""A small Vision Transformer in Flax linen, with the parameter naming of
google-research/vision_transformer (``Transformer/encoderblock_0/MlpBlock_0/Dense_0``,
``.../MultiHeadDotProductAttention_0/query``), which :func:`nm_sparse_jax.policy.vit` selects.

The paper's ViT-tiny (§4) is ``ViTConfig(hidden=192, depth=3, heads=3, mlp_dim=768)``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ViTConfig", "VisionTransformer"]


class ViTConfig(NamedTuple):
  """Shape of a :class:`VisionTransformer`."""

  image_size: int = 8
  patch_size: int = 2
  channels: int = 1
  num_classes: int = 10
  hidden: int = 128
  depth: int = 3
  heads: int = 4
  mlp_dim: int = 512
  dropout: float = 0.0

  @property
  def tokens(self) -> int:
    """Sequence length: the patches plus the class token."""
    return (self.image_size // self.patch_size) ** 2 + 1

  def kernel_tokens(self, path: str) -> int:
    """How many tokens the kernel at ``path`` multiplies per image (for FLOP counts): the
    patches for the embedding, the class token for the head, every token elsewhere.

    >>> ViTConfig().kernel_tokens("head/kernel"), ViTConfig().kernel_tokens("embedding/kernel")
    (1, 16)
    """
    if path.startswith("head/"):
      return 1
    if path.startswith("embedding/"):
      return self.tokens - 1
    return self.tokens


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_dim = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(out_dim, name="Dense_1")(x)


class Encoder1DBlock(nn.Module):
  heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.heads, name="MultiHeadDotProductAttention_0"
    )(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name="LayerNorm_1")(x)
    return x + MlpBlock(self.mlp_dim, self.dropout, name="MlpBlock_0")(y, train=train)


class Encoder(nn.Module):
  depth: int
  heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in range(self.depth):
      x = Encoder1DBlock(self.heads, self.mlp_dim, self.dropout, name=f"encoderblock_{i}")(
        x, train=train
      )
    return nn.LayerNorm(name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT classifier: patch embedding, class token, pre-norm encoder blocks, linear head.

  >>> model = VisionTransformer(ViTConfig())
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  >>> params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"].shape
  (128, 512)
  """

  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    c = self.config
    x = nn.Conv(c.hidden, (c.patch_size,) * 2, strides=(c.patch_size,) * 2, name="embedding")(
      images
    )
    x = x.reshape(x.shape[0], -1, c.hidden)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c.hidden))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.hidden)), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, c.tokens, c.hidden))
    x = x + pos
    x = Encoder(c.depth, c.heads, c.mlp_dim, c.dropout, name="Transformer")(x, train=train)
    return nn.Dense(c.num_classes, name="head")(x[:, 0])

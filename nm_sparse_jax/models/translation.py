"""A small encoder-decoder Transformer for translation, with T5 1.1 parameter naming.

Pre-LayerNorm blocks, learned absolute position embeddings, a shared token embedding and an
untied output projection. Every kernel is a 2-D ``(in, out)`` Dense kernel (contraction axis 0),
named as in T5X's T5 1.1 so that :func:`nm_sparse_jax.policy.t5_1_1` selects its groups::

  encoder/layers_0/attention/{query,key,value,out}/kernel
  encoder/layers_0/mlp/{wi,wo}/kernel
  decoder/layers_0/self_attention/{query,key,value,out}/kernel
  decoder/layers_0/encoder_decoder_attention/{query,key,value,out}/kernel
  decoder/layers_0/mlp/{wi,wo}/kernel
  decoder/logits_dense/kernel

Token id 0 is padding and the decoder's start token; the metric is token accuracy (the paper's
Table 5): the fraction of non-padding target tokens predicted exactly under teacher forcing.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = [
  "EncoderDecoder",
  "TranslationConfig",
  "attention_einsum_flops",
  "shift_right",
  "token_accuracy",
  "token_loss",
]


class TranslationConfig(NamedTuple):
  """Shape of an :class:`EncoderDecoder` (``layers`` encoder and ``layers`` decoder blocks)."""

  vocab_size: int = 2000
  hidden: int = 128
  layers: int = 2
  heads: int = 4
  mlp_dim: int = 512
  max_len: int = 48
  dropout: float = 0.0


class MultiHeadAttention(nn.Module):
  """Dot-product attention with 2-D ``query``/``key``/``value``/``out`` kernels."""

  heads: int

  @nn.compact
  def __call__(self, x, context, mask):
    hidden = x.shape[-1]
    head_dim = hidden // self.heads

    def project(name, y):
      return nn.Dense(hidden, name=name)(y).reshape(y.shape[:-1] + (self.heads, head_dim))

    q, k, v = project("query", x), project("key", context), project("value", context)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim)).astype(q.dtype)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return nn.Dense(hidden, name="out")(out.reshape(x.shape[:-1] + (hidden,)))


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.gelu(nn.Dense(self.mlp_dim, name="wi")(x))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.Dense(x.shape[-1], name="wo")(y)


class EncoderLayer(nn.Module):
  config: TranslationConfig

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    c = self.config
    y = nn.LayerNorm(name="pre_attention_layer_norm")(x)
    y = MultiHeadAttention(c.heads, name="attention")(y, y, mask)
    x = x + nn.Dropout(c.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name="pre_mlp_layer_norm")(x)
    return x + MlpBlock(c.mlp_dim, c.dropout, name="mlp")(y, train=train)


class DecoderLayer(nn.Module):
  config: TranslationConfig

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, *, train: bool):
    c = self.config
    y = nn.LayerNorm(name="pre_self_attention_layer_norm")(x)
    y = MultiHeadAttention(c.heads, name="self_attention")(y, y, self_mask)
    x = x + nn.Dropout(c.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name="pre_cross_attention_layer_norm")(x)
    y = MultiHeadAttention(c.heads, name="encoder_decoder_attention")(y, encoded, cross_mask)
    x = x + nn.Dropout(c.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name="pre_mlp_layer_norm")(x)
    return x + MlpBlock(c.mlp_dim, c.dropout, name="mlp")(y, train=train)


class Encoder(nn.Module):
  config: TranslationConfig

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    c = self.config
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, c.max_len, c.hidden))
    x = x + pos[:, : x.shape[1]]
    for i in range(c.layers):
      x = EncoderLayer(c, name=f"layers_{i}")(x, mask, train=train)
    return nn.LayerNorm(name="encoder_norm")(x)


class Decoder(nn.Module):
  config: TranslationConfig

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, *, train: bool):
    c = self.config
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, c.max_len, c.hidden))
    x = x + pos[:, : x.shape[1]]
    for i in range(c.layers):
      x = DecoderLayer(c, name=f"layers_{i}")(x, encoded, self_mask, cross_mask, train=train)
    x = nn.LayerNorm(name="decoder_norm")(x)
    return nn.Dense(c.vocab_size, name="logits_dense")(x)


class EncoderDecoder(nn.Module):
  """Encoder-decoder Transformer: ``(inputs, decoder_inputs) -> logits`` (teacher forcing).

  ``inputs`` and ``decoder_inputs`` are int token ids ``(batch, length)`` with 0 as padding;
  ``decoder_inputs`` is :func:`shift_right` of the targets.

  >>> model = EncoderDecoder(TranslationConfig(vocab_size=16, hidden=8, heads=2, mlp_dim=16))
  >>> tokens = jnp.array([[5, 6, 1, 0]])
  >>> params = model.init(jax.random.key(0), tokens, shift_right(tokens))["params"]
  >>> params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].shape
  (8, 16)
  >>> model.apply({"params": params}, tokens, shift_right(tokens)).shape
  (1, 4, 16)
  """

  config: TranslationConfig

  @nn.compact
  def __call__(self, inputs, decoder_inputs, *, train: bool = False):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden, name="token_embedder")
    src_valid = inputs > 0
    enc_mask = nn.make_attention_mask(src_valid, src_valid)
    encoded = Encoder(c, name="encoder")(embed(inputs), enc_mask, train=train)
    tgt_len = decoder_inputs.shape[1]
    causal = nn.make_causal_mask(jnp.ones((decoder_inputs.shape[0], tgt_len), jnp.int32))
    cross_mask = nn.make_attention_mask(jnp.ones(decoder_inputs.shape, jnp.bool_), src_valid)
    return Decoder(c, name="decoder")(
      embed(decoder_inputs), encoded, causal, cross_mask, train=train
    )


def shift_right(targets: jax.Array) -> jax.Array:
  """Decoder inputs: the targets shifted one position right, starting with 0.

  >>> shift_right(jnp.array([[7, 8, 1, 0]]))
  Array([[0, 7, 8, 1]], dtype=int32)
  """
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy over the non-padding target tokens."""
  weights = (targets > 0).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def token_accuracy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(correct, count)`` over non-padding target tokens; accuracy is ``correct / count``.

  >>> logits = jnp.eye(4)[jnp.array([[2, 3, 1, 0]])]  # predicts 2, 3, 1, 0
  >>> [int(v) for v in token_accuracy(logits, jnp.array([[2, 5, 1, 0]]))]
  [2, 3]
  """
  valid = targets > 0
  correct = (jnp.argmax(logits, -1) == targets) & valid
  return jnp.sum(correct, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)


def attention_einsum_flops(config: TranslationConfig) -> float:
  """Forward FLOPs per example of the attention einsums (logits and attend), ``L = max_len``.

  (Every kernel multiplies ``max_len`` tokens per example: sequences are padded to it.)

  Encoder self-attention, decoder self-attention and cross-attention each cost
  ``2 * (2 * L * L * hidden)`` per layer.

  >>> attention_einsum_flops(TranslationConfig(hidden=8, layers=1, max_len=4))
  1536.0
  """
  c = config
  return float(3 * c.layers * 2 * (2 * c.max_len * c.max_len * c.hidden))

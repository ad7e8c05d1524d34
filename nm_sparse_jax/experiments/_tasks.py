"""The model and data of a comparison: a :class:`Task` per data set."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nm_sparse_jax.flops import attention_einsum_flops
from nm_sparse_jax.models.vit import VisionTransformer, ViTConfig

__all__ = ["TASKS", "Task", "digits_task", "fashion_mnist_task", "make_task", "translation_task"]


class Task(NamedTuple):
  """A model, its data, and how to run and score it.

  Attributes:
    name: the task's name.
    description: one line for logs and reports (data, model, sizes).
    model: the unwrapped Flax model.
    naming: its parameter naming, a key of ``policy.LAYER_GROUPS`` ("vit", "t5_1_1").
    train: the training arrays, all with the same first axis (inputs..., labels).
    test: the test arrays, likewise.
    inputs: ``batch -> (model arguments)``: the model runs as ``model(*inputs(batch))``.
    loss: ``(logits, batch) -> scalar loss``.
    correct: ``(logits, batch) -> (correct, count)`` int32 scalars (accuracy = their ratio).
    tokens: tokens per example each kernel multiplies, or a function of its path (FLOPs).
    extra_dense_flops: forward FLOPs per example outside the kernels (attention einsums).
  """

  name: str
  description: str
  model: nn.Module
  naming: str
  train: tuple[np.ndarray, ...]
  test: tuple[np.ndarray, ...]
  inputs: Callable[[tuple[jax.Array, ...]], tuple[jax.Array, ...]]
  loss: Callable[[jax.Array, tuple[jax.Array, ...]], jax.Array]
  correct: Callable[[jax.Array, tuple[jax.Array, ...]], tuple[jax.Array, jax.Array]]
  tokens: int | Callable[[str], int]
  extra_dense_flops: float


def _subset(arrays, size: int | None, seed: int = 0):
  if size is None or size >= len(arrays[0]):
    return tuple(arrays)
  keep = np.sort(np.random.default_rng(seed).permutation(len(arrays[0]))[:size])
  return tuple(a[keep] for a in arrays)


def _classify_loss(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[-1]).mean()


def _classify_correct(logits, batch):
  labels = batch[-1]
  return jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32), jnp.asarray(
    labels.shape[0], jnp.int32
  )


def _image_task(name, description, train, test, config: ViTConfig) -> Task:
  return Task(
    name=name,
    description=description,
    model=VisionTransformer(config),
    naming="vit",
    train=tuple(train),
    test=tuple(test),
    inputs=lambda batch: batch[:1],
    loss=_classify_loss,
    correct=_classify_correct,
    tokens=config.kernel_tokens,
    extra_dense_flops=attention_einsum_flops(
      tokens=config.tokens, hidden=config.hidden, layers=config.depth
    ),
  )


def fashion_mnist_task(
  *,
  data_dir: str | os.PathLike | None = None,
  patch_size: int = 4,
  hidden: int = 192,
  depth: int = 3,
  heads: int = 3,
  mlp_dim: int = 768,
  train_subset: int | None = None,
  test_subset: int | None = None,
) -> Task:
  """ViT on Fashion-MNIST; the defaults are the paper's ViT-tiny (§4) with 4x4 patches.

  ``train_subset``/``test_subset`` keep a fixed random subset (seed 0) of that many examples.
  """
  from nm_sparse_jax.data.fashion_mnist import load_fashion_mnist

  train, test = load_fashion_mnist(data_dir)
  train, test = _subset(train, train_subset), _subset(test, test_subset)
  config = ViTConfig(
    image_size=28,
    patch_size=patch_size,
    channels=1,
    num_classes=10,
    hidden=hidden,
    depth=depth,
    heads=heads,
    mlp_dim=mlp_dim,
  )
  description = (
    f"Fashion-MNIST ({len(train[1])} train / {len(test[1])} test), ViT hidden {hidden}, "
    f"depth {depth}, heads {heads}, MLP {mlp_dim}, patch {patch_size} ({config.tokens} tokens)"
  )
  return _image_task("fashion_mnist", description, train, test, config)


def digits_task(
  *, patch_size: int = 2, hidden: int = 32, depth: int = 1, heads: int = 2, mlp_dim: int = 64
) -> Task:
  """A tiny ViT on scikit-learn's bundled digits (for tests and quick trials)."""
  from nm_sparse_jax.data.digits import load_digits

  train, test = load_digits()
  config = ViTConfig(
    image_size=8, patch_size=patch_size, hidden=hidden, depth=depth, heads=heads, mlp_dim=mlp_dim
  )
  description = (
    f"digits ({len(train.labels)} train / {len(test.labels)} test), ViT hidden {hidden}, "
    f"depth {depth}, heads {heads}, MLP {mlp_dim}, patch {patch_size}"
  )
  return _image_task("digits", description, train, test, config)


def translation_task(
  *,
  db_path: str | os.PathLike | None = None,
  vocab_size: int = 2000,
  max_len: int = 48,
  hidden: int = 128,
  depth: int = 2,
  heads: int = 4,
  mlp_dim: int = 512,
  train_subset: int | None = None,
  test_subset: int | None = None,
  cache_dir: str | os.PathLike | None = None,
) -> Task:
  """English -> German Bible verses (KJV -> Schlachter) with a small encoder-decoder."""
  from nm_sparse_jax.data.bible import load_bible_translation
  from nm_sparse_jax.models import translation as tr

  data = load_bible_translation(
    db_path, vocab_size=vocab_size, max_len=max_len, cache_dir=cache_dir
  )
  config = tr.TranslationConfig(
    vocab_size=data.vocab_size,
    hidden=hidden,
    layers=depth,
    heads=heads,
    mlp_dim=mlp_dim,
    max_len=max_len,
  )
  train = _subset((data.train_inputs, data.train_targets), train_subset)
  test = _subset((data.test_inputs, data.test_targets), test_subset)
  description = (
    f"Bible en->de ({len(train[0])} train / {len(test[0])} test pairs, vocab "
    f"{data.vocab_size}, length {max_len}), encoder-decoder {depth}+{depth} layers, hidden "
    f"{hidden}, heads {heads}, MLP {mlp_dim}"
  )
  return Task(
    name="bible",
    description=description,
    model=tr.EncoderDecoder(config),
    naming="t5_1_1",
    train=train,
    test=test,
    inputs=lambda batch: (batch[0], tr.shift_right(batch[1])),
    loss=lambda logits, batch: tr.token_loss(logits, batch[1]),
    correct=lambda logits, batch: tr.token_accuracy(logits, batch[1]),
    tokens=max_len,
    extra_dense_flops=tr.attention_einsum_flops(config),
  )


TASKS = {"fashion_mnist": fashion_mnist_task, "bible": translation_task, "digits": digits_task}


def make_task(name: str, **kwargs) -> Task:
  """Builds the task ``name`` (a key of :data:`TASKS`) with its factory's keyword arguments.

  Raises:
    ValueError: an unknown task.
  """
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
  return TASKS[name](**kwargs)

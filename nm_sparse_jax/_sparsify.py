"""The sparse weight ``W~`` of one kernel at a (traced) step, with each recipe's gradient."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from nm_sparse_jax._masks import NM, contraction_axes, nm_mask
from nm_sparse_jax.recipes import Recipe

__all__ = ["sparsify"]


@jax.custom_vjp
def _decayed_weight(w, mask, decay, straight_through, refine):
  """``w * (mask + decay * (1 - mask))``, computed exactly: kept weights are ``w`` itself."""
  return jnp.where(mask, w, w * decay.astype(w.dtype))


def _decayed_weight_fwd(w, mask, decay, straight_through, refine):
  out = _decayed_weight(w, mask, decay, straight_through, refine)
  return out, (w, mask, decay, straight_through, refine)


def _decayed_weight_bwd(residuals, g):
  """``dW = g * s + refine * (1 - mask) * w``, ``s = 1`` (straight-through) or the multiplier."""
  w, mask, decay, straight_through, refine = residuals
  scale = jnp.where(mask | straight_through, 1, decay).astype(g.dtype)
  dw = g * scale + jnp.where(mask, 0, refine.astype(w.dtype) * w)
  return dw, None, None, None, None


_decayed_weight.defvjp(_decayed_weight_fwd, _decayed_weight_bwd)


def sparsify_with_patterns(
  w: jax.Array,
  recipe: Recipe,
  step: jax.typing.ArrayLike,
  axes: tuple[int, ...],
  patterns: tuple[NM, ...],
) -> jax.Array:
  """:func:`sparsify` for already validated ``axes`` and ``recipe.patterns(...)``."""
  if not patterns:
    return w
  step = jnp.asarray(step, jnp.int32)
  branches = [lambda v: jnp.ones(v.shape, jnp.bool_)] + [
    functools.partial(nm_mask, n=p.n, m=p.m, axis=axes) for p in patterns
  ]
  mask = lax.switch(recipe.mask_branch(step, len(patterns)), branches, lax.stop_gradient(w))
  return _decayed_weight(
    w, mask, recipe.decay(step), recipe.straight_through(step), recipe.refine(step)
  )


def sparsify(
  w: jax.typing.ArrayLike,
  recipe: Recipe,
  step: jax.typing.ArrayLike,
  *,
  axis: int | Sequence[int] = 0,
) -> jax.Array:
  """The recipe's sparse weight ``W~`` for one kernel at training step ``step``.

  ``W~ = W * (Phi + D(j) * (1 - Phi))``, with ``Phi`` the recipe's N:M mask of ``W`` along the
  contraction axis at step ``j`` (all ones in the dense phase) and ``D(j)`` its decay factor
  (see :mod:`nm_sparse_jax.recipes`). Kept weights are passed through bit for bit.

  Gradient, with ``g`` the incoming gradient:

  * MDGF/SDGF, ``gradient="autodiff"``: ``g * (Phi + D * (1 - Phi))``;
  * MDGF/SDGF, ``gradient="straight_through"``: ``g``;
  * SR-STE (STE) in the sparsification phase: ``g + lambda_w * (1 - Phi) * W`` (``g``);
  * every recipe in the fine-tune phase: ``g * Phi`` (``g`` for straight-through MDGF/SDGF).

  ``step`` may be traced: phases, decay and patterns change without recompiling.

  Args:
    w: a floating-point kernel.
    recipe: a :class:`~nm_sparse_jax.recipes.Recipe` with its target N:M set.
    step: the training step ``j`` (int, or a traced int32 scalar).
    axis: the contraction axis, or a tuple of adjacent axes flattened row-major.

  Returns:
    ``W~``, with ``w``'s shape and dtype.

  Raises:
    ValueError: non-float ``w``, an axis out of range, ``m`` not dividing the axis, an unset
      target, or an SDGF pattern that cannot fit.

  >>> import jax.numpy as jnp
  >>> from nm_sparse_jax import recipes
  >>> r = recipes.mdgf_linear("1:2", total_steps=10, beta=0.25)
  >>> w = jnp.array([[1.0, -4.0], [-2.0, 3.0]])  # (in=2, out=2)
  >>> sparsify(w, r, 2)  # D = 0.5 on the pruned weight of each group
  Array([[ 0.5, -4. ],
         [-2. ,  1.5]], dtype=float32)
  """
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"sparsify needs a floating-point weight, got dtype {w.dtype}")
  axes = contraction_axes(axis, w.ndim, where=f"weight with shape {w.shape}")
  size = math.prod(w.shape[a] for a in axes)
  patterns = recipe.patterns(size, where=f"weight with shape {w.shape} (axis {axis})")
  return sparsify_with_patterns(w, recipe, step, axes, patterns)

"""N:M magnitude masks along a weight's contraction axis.

An N:M mask keeps the ``n`` largest ``|x|`` in every group of ``m`` consecutive elements along
an axis (element ``i`` of that axis belongs to group ``i // m``); among equal magnitudes the lower
index is kept. For a kernel, the axis is its *contraction (input) axis*: axis 0 of a Flax
``Dense`` kernel ``(in, out)``, axes ``(0, 1)`` of an attention output kernel
``(heads, head_dim, embed)``. That is the axis sparse hardware and sparse kernels need.

No sort is used. Magnitudes are compared as integers (the bit pattern of ``|x|``, which orders
like the value; NaN counts as larger than infinity), with the index breaking ties, and the
selection is one of:

* ``min(n, m - n) == 1`` -- one reduction pass per group finds the single element to keep
  (``n == 1``, an argmax) or to drop (``n == m - 1``);
* ``m <= 16`` -- every element counts the elements of its group that beat it (``m`` comparisons
  per element, fused into one pass) and is kept when fewer than ``n`` do;
* otherwise -- ``min(n, m - n)`` reduction passes walk down (or up) the group's order to the
  ``n``-th element, and one comparison pass against it gives the mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["NM", "contraction_axes", "nm_mask", "parse_nm"]

# Above this many passes the selection runs in a `fori_loop` instead of unrolled Python, which
# keeps compile time flat for patterns such as 1024:2048.
_MAX_UNROLLED_PASSES = 32
# Largest group size handled by the all-pairs rank comparison.
_MAX_RANK_GROUP = 16


class NM(NamedTuple):
  """An N:M pattern: at most ``n`` nonzeros in every group of ``m`` consecutive weights.

  >>> NM(1, 8)
  NM(n=1, m=8)
  >>> str(NM(2, 4)), NM(1, 8).density
  ('2:4', 0.125)
  """

  n: int
  m: int

  def __str__(self) -> str:
    return f"{self.n}:{self.m}"

  @property
  def density(self) -> float:
    """Fraction of weights kept, ``n / m``."""
    return self.n / self.m


def parse_nm(spec: NM | str | Sequence[int], *, name: str = "pattern") -> NM:
  """Reads an N:M pattern from ``"1:8"``, ``(1, 8)`` or an :class:`NM`.

  Args:
    spec: the pattern.
    name: what to call the value in error messages.

  Returns:
    The validated :class:`NM`.

  Raises:
    ValueError: the pattern is malformed or does not satisfy ``1 <= n < m``.

  >>> parse_nm("1:8"), parse_nm((2, 4))
  (NM(n=1, m=8), NM(n=2, m=4))
  """
  if isinstance(spec, str):
    parts = spec.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
      raise ValueError(f"{name}={spec!r} is not an N:M pattern such as '1:8' or '2:4'")
    n, m = (int(p) for p in parts)
  else:
    try:
      n, m = spec
    except (TypeError, ValueError):
      raise ValueError(
        f"{name}={spec!r} is not an N:M pattern such as '1:8', (1, 8) or NM(1, 8)"
      ) from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (n, m)):
      raise ValueError(f"{name}={spec!r}: n and m must be integers")
  n, m = int(n), int(m)
  if not 1 <= n < m:
    raise ValueError(f"{name}={n}:{m} breaks 1 <= n < m (n={n}, m={m})")
  return NM(n, m)


def contraction_axes(axis: int | Sequence[int], ndim: int, *, where: str = "x") -> tuple[int, ...]:
  """Normalises ``axis`` (an int or a tuple of adjacent axes) to sorted non-negative ints.

  Raises:
    ValueError: an axis is out of range, repeated, or the axes are not adjacent.

  >>> contraction_axes(-1, 3), contraction_axes((0, 1), 3)
  ((2,), (0, 1))
  """
  axes = (axis,) if isinstance(axis, (int, np.integer)) or not np.iterable(axis) else tuple(axis)
  if not axes:
    raise ValueError(f"{where}: axis=() names no axis")
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
      raise ValueError(f"{where}: axis={axis!r} must be an int or a tuple of ints")
    if not -ndim <= a < ndim:
      raise ValueError(f"{where}: axis {a} is out of range for an array of rank {ndim}")
    out.append(int(a) % ndim)
  out = sorted(out)
  if len(set(out)) != len(out) or out != list(range(out[0], out[0] + len(out))):
    raise ValueError(f"{where}: axis={axis!r} must name distinct, adjacent axes")
  return tuple(out)


def _grouped_shape(shape: tuple[int, ...], axes: tuple[int, ...], m: int) -> tuple[int, ...]:
  pre = math.prod(shape[: axes[0]])
  size = math.prod(shape[a] for a in axes)
  post = math.prod(shape[axes[-1] + 1 :])
  return (pre, size // m, m, post)


def _magnitude_keys(x: jax.Array) -> jax.Array:
  """Integers that order like ``|x|``: the bit pattern of ``|x|`` read as a signed int."""
  int_dtype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
  return lax.bitcast_convert_type(jnp.abs(x), int_dtype)


def _select_by_rank(keys: jax.Array, n: int) -> jax.Array:
  """Keeps element i when fewer than n elements of its group beat it (all pairs, one pass)."""
  m = keys.shape[2]
  k_i = keys[:, :, :, None, :]
  k_j = keys[:, :, None, :, :]
  i = lax.broadcasted_iota(jnp.int32, (1, 1, m, m, 1), 2)
  j = lax.broadcasted_iota(jnp.int32, (1, 1, m, m, 1), 3)
  beats = (k_j > k_i) | ((k_j == k_i) & (j < i))
  return jnp.sum(beats, axis=3, dtype=jnp.int32) < n


def _select_top(keys: jax.Array, index: jax.Array, count: int) -> jax.Array:
  """Marks the ``count`` first elements of each group in (key descending, index ascending) order.

  Each pass finds the next element after the running threshold ``(tk, ti)`` with two one-operand
  reductions (the largest key below the threshold, then its lowest index).
  """
  key_max = jnp.iinfo(keys.dtype).max
  m = keys.shape[2]
  reduced = keys.shape[:2] + (1,) + keys.shape[3:]

  def one_pass(_, threshold):
    tk, ti = threshold
    after = (keys < tk) | ((keys == tk) & (index > ti))
    tk = jnp.max(jnp.where(after, keys, jnp.array(-1, keys.dtype)), axis=2, keepdims=True)
    ti = jnp.min(jnp.where(after & (keys == tk), index, m), axis=2, keepdims=True)
    return tk, ti

  threshold = (jnp.full(reduced, key_max, keys.dtype), jnp.full(reduced, -1, jnp.int32))
  if count <= _MAX_UNROLLED_PASSES:
    for p in range(count):
      threshold = one_pass(p, threshold)
  else:
    threshold = lax.fori_loop(0, count, one_pass, threshold)
  tk, ti = threshold
  if count == 1:
    return index == ti
  return (keys > tk) | ((keys == tk) & (index <= ti))


def nm_mask(x: jax.typing.ArrayLike, n: int, m: int, *, axis: int | Sequence[int] = 0) -> jax.Array:
  """The N:M magnitude mask of ``x`` along its contraction axis.

  ``mask[..., i, ...]`` is True for the ``n`` largest ``|x|`` in each group
  ``{g*m, ..., g*m + m - 1}`` of ``axis``; ties keep the lower index. Exactly ``n`` elements of
  every group are True.

  Args:
    x: a floating-point array (float32, bfloat16, float16, ...).
    n: elements kept per group, ``1 <= n < m``; static.
    m: group size; must divide the size of ``axis``; static.
    axis: the contraction axis, or a tuple of adjacent axes that are flattened row-major (for a
      kernel that contracts over several axes, such as an attention output kernel
      ``(heads, head_dim, embed)`` with ``axis=(0, 1)``). Static.

  Returns:
    A bool array of ``x``'s shape.

  Raises:
    ValueError: ``n``/``m`` break ``1 <= n < m``, ``m`` does not divide the axis, the axis is
      out of range, or ``x`` is not floating point.

  >>> import jax.numpy as jnp
  >>> w = jnp.array([[0.1, -3.0], [2.0, 0.5], [-0.2, 0.4], [1.0, 0.0]])  # (in=4, out=2)
  >>> nm_mask(w, 2, 4, axis=0).astype(int)  # 2 of every 4 along the input axis
  Array([[0, 1],
         [1, 1],
         [0, 0],
         [1, 0]], dtype=int32)
  """
  x = jnp.asarray(x)
  n, m = parse_nm((n, m), name="n:m")
  axes = contraction_axes(axis, x.ndim)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"nm_mask needs a floating-point array, got dtype {x.dtype}")
  size = math.prod(x.shape[a] for a in axes)
  if size % m:
    raise ValueError(
      f"x with shape {x.shape}: axis {axes if len(axes) > 1 else axes[0]} has size {size}, "
      f"not divisible by m={m}"
    )
  if jax.default_backend() == "gpu":
    # On a GPU, optionally the one-pass Pallas kernel (same result; see use_mask_kernel).
    from nm_sparse_jax.kernels._masks import nm_mask_pallas, use_mask_kernel

    if use_mask_kernel(x, n, m, axes):
      return nm_mask_pallas(x, n, m, axis=axes)
  grouped = x.reshape(_grouped_shape(x.shape, axes, m))
  keys = _magnitude_keys(grouped)
  index = lax.broadcasted_iota(jnp.int32, grouped.shape, 2)
  if min(n, m - n) > 1 and m <= _MAX_RANK_GROUP:
    mask = _select_by_rank(keys, n)
  elif n <= m - n:
    mask = _select_top(keys, index, n)
  else:
    # Find the m - n elements to drop: reversing key and index order turns them into the top.
    key_max = jnp.iinfo(keys.dtype).max
    mask = ~_select_top(key_max - keys, (m - 1) - index, m - n)
  return mask.reshape(x.shape)

"""The compressed N:M format: the kept values of every group plus their in-group index.

A kernel ``W`` with contraction axes ``axes`` is seen as a matrix ``(K, O)``: ``K`` is the
row-major flattening of the contraction axes, ``O`` that of the other axes (those before the
contraction axes, then those after). For every output ``o`` and group ``g`` of ``m`` consecutive
inputs, the format keeps the ``n`` largest-magnitude weights (the :func:`~nm_sparse_jax.nm_mask`
selection, ties to the lower index) in increasing input order:

* ``values[o, g*n + s]`` -- the ``s``-th kept weight of group ``g`` of output ``o``;
* ``index[o, g*n + s]`` -- its position ``j`` in the group (uint8, ``0 <= j < m``), so that
  ``W[g*m + j, o] = values[o, g*n + s]``.

Both arrays are ``(O, K*n/m)``: the contraction dimension is minor, the layout the N:M kernels
(:mod:`nm_sparse_jax.kernels`) read. A weight that is already N:M round-trips exactly; a group
with fewer than ``n`` nonzeros stores explicit zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nm_sparse_jax._masks import contraction_axes, nm_mask, parse_nm

__all__ = ["NMCompressed", "compress", "decompress", "matrix_view", "unmatrix_view"]

# The in-group index is stored as uint8.
_MAX_M = 256


def matrix_view(w: jax.Array, axes: Sequence[int]) -> jax.Array:
  """``w`` as a ``(K, O)`` matrix: contraction axes flattened to ``K``, the others to ``O``.

  >>> matrix_view(jnp.zeros((2, 3, 5)), (0, 1)).shape
  (6, 5)
  """
  axes = contraction_axes(tuple(axes), w.ndim)
  pre, post = w.shape[: axes[0]], w.shape[axes[-1] + 1 :]
  k = math.prod(w.shape[a] for a in axes)
  grouped = w.reshape(math.prod(pre), k, math.prod(post))
  return jnp.transpose(grouped, (1, 0, 2)).reshape(k, -1)


def unmatrix_view(mat: jax.Array, shape: Sequence[int], axes: Sequence[int]) -> jax.Array:
  """The inverse of :func:`matrix_view`: a ``(K, O)`` matrix back to the kernel ``shape``."""
  shape = tuple(shape)
  axes = contraction_axes(tuple(axes), len(shape))
  pre, post = shape[: axes[0]], shape[axes[-1] + 1 :]
  grouped = mat.reshape(mat.shape[0], math.prod(pre), math.prod(post))
  return jnp.transpose(grouped, (1, 0, 2)).reshape(shape)


# A registered dataclass, not a NamedTuple: n, m, shape and axes must be static pytree metadata
# (they fix array shapes and kernel configurations), and a NamedTuple's fields are all children.
@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["values", "index"],
  meta_fields=["n", "m", "shape", "axes"],
)
@dataclasses.dataclass(frozen=True)
class NMCompressed:
  """An N:M kernel as kept values and in-group indices; see the module docstring.

  Attributes:
    values: ``(O, K*n/m)`` kept weights, in the weight's dtype.
    index: ``(O, K*n/m)`` uint8 position of each kept weight inside its group of ``m``.
    n: weights kept per group.
    m: group size along the contraction axis.
    shape: shape of the dense kernel.
    axes: its contraction axes.
  """

  values: jax.Array
  index: jax.Array
  n: int
  m: int
  shape: tuple[int, ...]
  axes: tuple[int, ...]

  @property
  def in_features(self) -> int:
    """``K``, the size of the flattened contraction axes."""
    return math.prod(self.shape[a] for a in self.axes)

  @property
  def out_features(self) -> int:
    """``O``, the size of the flattened other axes."""
    return math.prod(self.shape) // self.in_features

  @property
  def nbytes(self) -> int:
    """Bytes of the two arrays."""
    return int(self.values.size * self.values.dtype.itemsize + self.index.size)


def compress(
  w: jax.typing.ArrayLike,
  n: int,
  m: int,
  *,
  axis: int | Sequence[int] = 0,
  dtype: jax.typing.DTypeLike | None = None,
) -> NMCompressed:
  """The compressed N:M form of ``w`` along its contraction axis ``axis``.

  ``values[o, g*n + s] = W[g*m + j_s, o]`` and ``index[o, g*n + s] = j_s``, where
  ``j_0 < ... < j_{n-1}`` are the positions that ``nm_mask(W, n, m, axis=axis)`` keeps in group
  ``g`` of output ``o``. For an N:M weight (such as :func:`~nm_sparse_jax.finalize`'s output)
  ``decompress(compress(w)) == w`` exactly; otherwise it equals ``w * nm_mask(w, n, m)``.
  Jittable.

  Args:
    w: the kernel.
    n: weights kept per group; static.
    m: group size, ``m <= 256`` (the index is uint8); static.
    axis: the contraction axis or adjacent axes (flattened row-major); static.
    dtype: dtype of ``values`` (default: ``w``'s).

  Returns:
    An :class:`NMCompressed`.

  Raises:
    ValueError: a bad pattern or axis, ``m > 256``, or ``m`` does not divide the axis.

  >>> w = jnp.array([[0.0, 1.0], [3.0, 0.0], [0.0, 0.0], [-2.0, 4.0]])  # (in=4, out=2), 1:2
  >>> c = compress(w, 1, 2)
  >>> c.values, c.index
  (Array([[ 3., -2.],
         [ 1.,  4.]], dtype=float32), Array([[1, 1],
         [0, 1]], dtype=uint8))
  >>> bool((decompress(c) == w).all())
  True
  """
  w = jnp.asarray(w)
  n, m = parse_nm((n, m), name="n:m")
  if m > _MAX_M:
    raise ValueError(f"compress: m={m} is larger than {_MAX_M} (the in-group index is uint8)")
  axes = contraction_axes(axis, w.ndim, where=f"w with shape {w.shape}")
  k = math.prod(w.shape[a] for a in axes)
  if k % m:
    raise ValueError(f"w with shape {w.shape}: axes {axes} have size {k}, not divisible by m={m}")
  dtype = jnp.dtype(dtype if dtype is not None else w.dtype)
  values, index = _compress(w, n=n, m=m, axes=axes, dtype=dtype)
  return NMCompressed(values=values, index=index, n=n, m=m, shape=tuple(w.shape), axes=axes)


@functools.partial(jax.jit, static_argnames=("n", "m", "axes", "dtype"))
def _compress(w, *, n, m, axes, dtype):
  mat_t = matrix_view(w, axes).T  # (O, K)
  o, k = mat_t.shape
  keep = nm_mask(mat_t, n, m, axis=1).reshape(o, k // m, m)
  # Stable sort of "not kept" puts the kept positions first, in increasing order.
  index = jnp.argsort(~keep, axis=2, stable=True)[:, :, :n]
  values = jnp.take_along_axis(mat_t.reshape(o, k // m, m), index, axis=2)
  return values.astype(dtype).reshape(o, -1), index.astype(jnp.uint8).reshape(o, -1)


def decompress(c: NMCompressed) -> jax.Array:
  """The dense kernel of ``c``: ``W[g*m + index[o, g*n+s], o] = values[o, g*n+s]``, else 0."""
  return _decompress(c.values, c.index, n=c.n, m=c.m, shape=c.shape, axes=c.axes)


@functools.partial(jax.jit, static_argnames=("n", "m", "shape", "axes"))
def _decompress(values, index, *, n, m, shape, axes):
  o, per_row = values.shape
  groups = per_row // n
  rows = jnp.arange(o)[:, None, None]
  cols = jnp.arange(groups)[None, :, None]
  index = index.reshape(o, groups, n).astype(jnp.int32)
  dense = jnp.zeros((o, groups, m), values.dtype)
  dense = dense.at[rows, cols, index].set(values.reshape(o, groups, n))
  return unmatrix_view(dense.reshape(o, groups * m).T, shape, axes)

"""jax.experimental.sparse BCSR export, in the layout JAX's cuSPARSE lowering accepts.

JAX lowers a BCSR product to cuSPARSE only when ``jax_bcoo_cusparse_lowering`` is on, the data
are float32 (or float64), the BCSR matrix is the *left* operand and has no batch or dense
dimensions, and the product contracts its dimension 1. So a kernel ``W`` seen as ``(K, O)``
(:func:`~nm_sparse_jax.export.matrix_view`) is stored transposed, ``W^T`` with shape ``(O, K)``,
and a layer computes ``y = (W^T @ x^T)^T``.

The matrix is built from the compressed N:M format, so every row has exactly ``K*n/m`` stored
entries in increasing column order (explicit zeros where a group has fewer than ``n`` nonzeros):
``nse = O*K*n/m`` is static and no ``bcsr_fromdense`` (which needs a concrete ``nse`` under
``jit``) is involved.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import sparse

from nm_sparse_jax.export._compressed import NMCompressed, compress

__all__ = ["BCSRKernel", "bcsr_from_compressed", "to_bcsr"]


# Static metadata next to the BCSR pytree, for the same reason as NMCompressed.
@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["matrix"],
  meta_fields=["n", "m", "shape", "axes"],
)
@dataclasses.dataclass(frozen=True)
class BCSRKernel:
  """An N:M kernel as a ``BCSR`` matrix ``W^T`` of shape ``(O, K)``, with its kernel metadata.

  Attributes:
    matrix: the ``jax.experimental.sparse.BCSR`` transposed weight (float32 by default).
    n, m: the N:M pattern along the contraction axis.
    shape: shape of the dense kernel.
    axes: its contraction axes.
  """

  matrix: sparse.BCSR
  n: int
  m: int
  shape: tuple[int, ...]
  axes: tuple[int, ...]

  @property
  def in_features(self) -> int:
    return self.matrix.shape[1]

  @property
  def out_features(self) -> int:
    return self.matrix.shape[0]


def bcsr_from_compressed(c: NMCompressed, *, dtype: jax.typing.DTypeLike = jnp.float32):
  """``W^T`` as a BCSR matrix ``(O, K)`` from the compressed format (jittable, static nse).

  ``data`` are ``c.values`` in row-major order, ``indices = g*m + index`` (int32) and
  ``indptr = [0, C, 2C, ...]`` with ``C = K*n/m`` entries per row.
  """
  o, per_row = c.values.shape
  group = jnp.arange(per_row, dtype=jnp.int32) // c.n
  columns = group[None, :] * c.m + c.index.astype(jnp.int32)
  indptr = jnp.arange(o + 1, dtype=jnp.int32) * per_row
  data = c.values.astype(dtype).reshape(-1)
  matrix = sparse.BCSR((data, columns.reshape(-1), indptr), shape=(o, c.in_features))
  return BCSRKernel(matrix=matrix, n=c.n, m=c.m, shape=c.shape, axes=c.axes)


def to_bcsr(
  w: jax.typing.ArrayLike,
  n: int,
  m: int,
  *,
  axis: int | Sequence[int] = 0,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> BCSRKernel:
  """The N:M kernel ``w`` as a :class:`BCSRKernel` (``W^T``, float32 by default).

  Keeps what :func:`~nm_sparse_jax.export.compress` keeps: for an N:M ``w``,
  ``to_bcsr(w, n, m).matrix.todense() == matrix_view(w, axes).T`` exactly.

  >>> w = jnp.array([[0.0, 1.0], [3.0, 0.0], [0.0, 0.0], [-2.0, 4.0]])  # (in=4, out=2), 1:2
  >>> b = to_bcsr(w, 1, 2)
  >>> b.matrix.indices, b.matrix.indptr
  (Array([1, 3, 0, 3], dtype=int32), Array([0, 2, 4], dtype=int32))
  >>> b.matrix.todense()
  Array([[ 0.,  3.,  0., -2.],
         [ 1.,  0.,  0.,  4.]], dtype=float32)
  """
  return bcsr_from_compressed(compress(w, n, m, axis=axis), dtype=dtype)

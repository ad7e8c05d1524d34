"""Export of N:M kernels to sparse formats for inference.

* :class:`NMCompressed` / :func:`compress` / :func:`decompress` -- kept values plus their
  in-group index (uint8), contraction dimension minor: the format of the N:M kernels in
  :mod:`nm_sparse_jax.kernels`;
* :class:`BCSRKernel` / :func:`to_bcsr` -- ``jax.experimental.sparse.BCSR`` in the layout JAX's
  cuSPARSE lowering accepts (``W^T``, float32, static ``nse``);
* :func:`export` -- every kernel a :class:`~nm_sparse_jax.Policy` selects, in a parameter tree.

A kernel of any rank is seen as a ``(K, O)`` matrix (:func:`matrix_view`): ``K`` flattens its
contraction axes (the axes the policy names), ``O`` the others.
"""

from nm_sparse_jax.export._bcsr import BCSRKernel, bcsr_from_compressed, to_bcsr
from nm_sparse_jax.export._compressed import (
  NMCompressed,
  compress,
  decompress,
  matrix_view,
  unmatrix_view,
)
from nm_sparse_jax.export._tree import FORMATS, export

__all__ = [
  "FORMATS",
  "BCSRKernel",
  "NMCompressed",
  "bcsr_from_compressed",
  "compress",
  "decompress",
  "export",
  "matrix_view",
  "to_bcsr",
  "unmatrix_view",
]

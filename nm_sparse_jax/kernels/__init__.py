"""Pallas GPU kernels for N:M sparsity (Triton backend; Pallas interpret mode on a CPU).

* :func:`nm_matmul` -- ``x @ W`` for a kernel in the compressed N:M format
  (:class:`~nm_sparse_jax.export.NMCompressed`): gather-FMA kernels for few tokens or few kept
  weights per output and two expand-then-tensor-core kernels for the rest;
* :func:`nm_mask_pallas` -- the N:M magnitude mask (:func:`~nm_sparse_jax.nm_mask`'s exact
  semantics) in one pass over the weight: the largest magnitude for ``N = 1``, else an
  interval bisection on the magnitudes' bit patterns;
  :func:`~nm_sparse_jax.nm_mask` uses it on a GPU where :func:`use_mask_kernel` says so.

JAX 0.11 deprecates Pallas's Triton backend (a ``DeprecationWarning`` when a kernel is lowered);
it still works there. Where a JAX lacks it, this package still imports: the kernels raise an
``ImportError`` that says so, and ``NM_SPARSE_JAX_MASK_KERNEL=auto`` leaves masks to XLA.

Block sizes were chosen by measurement on an H100 and an H200 (BENCHMARKS.md); ``bench spmm``
times the :func:`candidate_configs` of each case and reports the fastest.
"""

from nm_sparse_jax.kernels._masks import (
  MaskConfig,
  default_mask_config,
  nm_mask_pallas,
  use_mask_kernel,
)
from nm_sparse_jax.kernels._spmm import (
  SpmmConfig,
  candidate_configs,
  default_config,
  nm_matmul,
  nm_matmul_reference,
)

__all__ = [
  "MaskConfig",
  "SpmmConfig",
  "candidate_configs",
  "default_config",
  "default_mask_config",
  "nm_mask_pallas",
  "nm_matmul",
  "nm_matmul_reference",
  "use_mask_kernel",
]

"""Pallas and its Triton backend, imported once for the kernels.

JAX 0.11 deprecates Pallas's Triton backend. Only the kernels need it: where a JAX lacks it, this
package still imports, :func:`~nm_sparse_jax.nm_mask` and the dense and BCSR inference paths
work, ``NM_SPARSE_JAX_MASK_KERNEL=auto`` falls back to XLA, and calling a kernel raises
:func:`require`'s ``ImportError``.
"""

from __future__ import annotations

import jax

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
except ImportError as error:  # a JAX without Pallas or without its Triton backend
  pl = plgpu = None
  _MISSING = f"{type(error).__name__}: {error}"
else:
  _MISSING = ""

__all__ = ["available", "pl", "plgpu", "require"]


def available() -> bool:
  """Whether Pallas's Triton backend imported."""
  return plgpu is not None


def require(caller: str) -> None:
  """Raises an ``ImportError`` naming ``caller`` where Pallas's Triton backend is missing.

  >>> require("nm_matmul")  # this JAX has it: nothing happens
  """
  if plgpu is None:
    raise ImportError(
      f"{caller} needs Pallas's Triton backend (jax.experimental.pallas.triton), which JAX "
      f"{jax.__version__} does not provide ({_MISSING}). nm_mask without the kernel and the "
      "dense and BCSR inference paths do not need it."
    )

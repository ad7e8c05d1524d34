"""Exporting the kernels a policy selects, in a whole parameter tree."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nm_sparse_jax.export._bcsr import bcsr_from_compressed
from nm_sparse_jax.export._compressed import compress, matrix_view
from nm_sparse_jax.policy import Policy, path_str

__all__ = ["FORMATS", "export"]

FORMATS = ("nm", "bcsr")


@functools.partial(jax.jit, static_argnames=("m", "axes"))
def _max_group_nonzeros(w: jax.Array, m: int, axes: tuple[int, ...]) -> jax.Array:
  mat = matrix_view(w, axes)
  return jnp.max(jnp.count_nonzero(mat.reshape(mat.shape[0] // m, m, -1), axis=1))


def export(
  params: Any,
  policy: Policy,
  *,
  format: str = "nm",
  dtype: jax.typing.DTypeLike | None = None,
  check: bool = True,
) -> Any:
  """``params`` with every kernel the policy makes N:M replaced by its sparse format.

  * ``format="nm"`` -- :class:`~nm_sparse_jax.export.NMCompressed` (values in ``dtype``, default
    the parameter's; the N:M kernels use bfloat16);
  * ``format="bcsr"`` -- :class:`~nm_sparse_jax.export.BCSRKernel` (``W^T`` as a
    ``jax.experimental.sparse.BCSR``, float32 unless ``dtype`` says otherwise).

  Other parameters are returned unchanged (the same objects). The exported tree goes to
  :func:`nm_sparse_jax.sparse_linear.apply` in place of the parameters.

  Args:
    params: N:M parameters, typically :func:`~nm_sparse_jax.finalize`'s output.
    policy: the policy the model was trained with (its targets and contraction axes).
    format: "nm" or "bcsr".
    dtype: dtype of the stored values.
    check: verify that every selected kernel is N:M along its contraction axes (one reduction
      per kernel), so that nothing is silently dropped.

  Raises:
    ValueError: an unknown format, anything :meth:`Policy.resolve` rejects, or (with ``check``)
      a kernel with more than ``n`` nonzeros in a group, named with its path, shape and axes.

  >>> from nm_sparse_jax import finalize, policy as nmp, recipes
  >>> pol = nmp.Policy([nmp.Rule("kernel", "1:2")], recipes.ste())
  >>> params = finalize({"kernel": jnp.array([[1.0, -5.0], [-2.0, 3.0]]), "bias": jnp.ones(2)}, pol)
  >>> exported = export(params, pol)
  >>> exported["kernel"].values, exported["kernel"].index
  (Array([[-2.],
         [-5.]], dtype=float32), Array([[1],
         [0]], dtype=uint8))
  """
  if format not in FORMATS:
    raise ValueError(f"export: format={format!r}; expected one of {', '.join(FORMATS)}")
  plan = policy.resolve(params)

  def leaf_fn(path, leaf):
    target = plan.targets.get(path_str(path))
    if target is None or not target.patterns or target.nm is None:
      return leaf
    n, m = target.nm
    if check:
      most = int(_max_group_nonzeros(jnp.asarray(leaf), m=m, axes=target.axes))
      if most > n:
        raise ValueError(
          f"export: {target.path} (shape {target.shape}, axes {target.axes}) is not {n}:{m}: "
          f"a group has {most} nonzeros; export finalize(params, policy)"
        )
    if format == "nm":
      return compress(leaf, n, m, axis=target.axes, dtype=dtype)
    c = compress(leaf, n, m, axis=target.axes)
    return bcsr_from_compressed(c, dtype=dtype if dtype is not None else jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf_fn, params)

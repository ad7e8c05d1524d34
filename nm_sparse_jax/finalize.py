"""Hard N:M parameters for export, and a verifier of the N:M structure along contraction axes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nm_sparse_jax._masks import NM, nm_mask
from nm_sparse_jax.policy import Policy, path_str

__all__ = ["LayerReport", "VerifyReport", "finalize", "group_nonzeros", "verify"]


def finalize(params: Any, policy: Policy) -> Any:
  """``params`` with every selected kernel replaced by ``W * Phi``, its target N:M mask applied.

  This is the recipe's fine-tune-phase weight: what a model trained with the policy computes
  with at the end of training. Unselected parameters are returned unchanged (the same objects),
  and dense-recipe rules change nothing.

  >>> import jax.numpy as jnp
  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> pol = nmp.Policy([nmp.Rule("kernel", "1:2")], recipes.sr_ste())
  >>> finalize({"kernel": jnp.array([[1.0, -5.0], [-2.0, 3.0]]), "bias": jnp.ones(2)}, pol)
  {'bias': Array([1., 1.], dtype=float32), 'kernel': Array([[ 0., -5.],
         [-2.,  0.]], dtype=float32)}
  """
  plan = policy.resolve(params)

  def leaf_fn(path, leaf):
    target = plan.targets.get(path_str(path))
    if target is None or not target.patterns:
      return leaf
    keep = nm_mask(leaf, target.nm.n, target.nm.m, axis=target.axes)
    return jnp.where(keep, leaf, jnp.zeros((), leaf.dtype))

  return jax.tree_util.tree_map_with_path(leaf_fn, params)


def group_nonzeros(x: Any, m: int, axis: int | Sequence[int] = 0) -> np.ndarray:
  """Nonzero count of every group of ``m`` along ``axis``: shape ``(groups, *other axes)``.

  >>> group_nonzeros(np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 3.0], [0.0, 4.0]]), 2)
  array([[1, 0],
         [1, 2]])
  """
  x = np.asarray(x)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(a % x.ndim for a in axes)
  moved = np.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  flat = moved.reshape(moved.shape[: x.ndim - len(axes)] + (-1, m))
  counts = np.count_nonzero(flat, axis=-1)
  return np.moveaxis(counts, -1, 0)


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """The N:M structure of one selected parameter along its contraction axis."""

  path: str
  shape: tuple[int, ...]
  axes: tuple[int, ...]
  target: NM
  satisfied: NM  # the smallest n' such that every group of m has at most n' nonzeros: n':m
  sparsity: float  # fraction of exact zeros in the parameter
  bad_groups: int  # groups with more than the target n nonzeros

  @property
  def ok(self) -> bool:
    return self.bad_groups == 0


@dataclasses.dataclass(frozen=True)
class VerifyReport:
  """Per-parameter N:M verification, printable as a table."""

  layers: tuple[LayerReport, ...]
  total_params: int
  total_zeros: int

  @property
  def ok(self) -> bool:
    return all(layer.ok for layer in self.layers)

  @property
  def sparsity(self) -> float:
    """Fraction of exact zeros over all parameters of the tree."""
    return self.total_zeros / max(self.total_params, 1)

  def __str__(self) -> str:
    rows = [("parameter", "shape", "axis", "target", "satisfies", "sparsity", "status")]
    for r in self.layers:
      rows.append(
        (
          r.path,
          "x".join(map(str, r.shape)),
          ",".join(map(str, r.axes)),
          str(r.target),
          str(r.satisfied),
          f"{r.sparsity:.4f}",
          "ok" if r.ok else f"FAIL ({r.bad_groups} groups)",
        )
      )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"overall sparsity of all parameters: {self.sparsity:.4f}")
    return "\n".join(lines)


def verify(params: Any, policy: Policy, *, strict: bool = True) -> VerifyReport:
  """Checks that every selected parameter is N:M along its contraction axis (host-side NumPy).

  Args:
    params: a parameter tree (e.g. :func:`finalize`'s output or a restored checkpoint).
    policy: the policy that selects the parameters and their targets.
    strict: raise when a group breaks its target.

  Returns:
    A :class:`VerifyReport`: per selected parameter, the pattern it satisfies and its sparsity.

  Raises:
    ValueError: with ``strict``, a group with more nonzeros than its target allows (the message
      names each failing parameter, its shape, axis, target and the first bad group).

  >>> import numpy as np
  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> pol = nmp.Policy([nmp.Rule("kernel", "1:4")], recipes.ste())
  >>> print(verify({"kernel": np.eye(8)}, pol))
  parameter  shape  axis  target  satisfies  sparsity  status
  kernel     8x8    0     1:4     1:4        0.8750    ok
  overall sparsity of all parameters: 0.8750
  """
  plan = policy.resolve(params)
  layers, failures = [], []
  total, zeros = 0, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.asarray(leaf)
    total += value.size
    zeros += value.size - np.count_nonzero(value)
    target = plan.targets.get(path_str(path))
    if target is None or target.nm is None or not target.patterns:
      continue
    counts = group_nonzeros(value, target.nm.m, target.axes)
    layer = LayerReport(
      path=target.path,
      shape=value.shape,
      axes=target.axes,
      target=target.nm,
      satisfied=NM(int(counts.max(initial=0)), target.nm.m),
      sparsity=1.0 - np.count_nonzero(value) / max(value.size, 1),
      bad_groups=int(np.count_nonzero(counts > target.nm.n)),
    )
    layers.append(layer)
    if not layer.ok:
      first = tuple(int(i) for i in np.argwhere(counts > target.nm.n)[0])
      failures.append(
        f"{layer.path} (shape {layer.shape}, axis {layer.axes}): {layer.bad_groups} groups "
        f"exceed {layer.target} (up to {layer.satisfied.n} nonzeros in a group of "
        f"{layer.target.m}; first bad group at index {first} of (group, *other axes))"
      )
  if strict and failures:
    raise ValueError("N:M verification failed:\n" + "\n".join(failures))
  return VerifyReport(layers=tuple(layers), total_params=total, total_zeros=zeros)

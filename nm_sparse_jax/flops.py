"""Inference FLOPs of a model with N:M kernels (the paper's Appendix D).

Appendix D counts ``FLOPS_tot = FLOPS_SA + FLOPS_FF * S_FF``: every matrix multiply costs
``2 * tokens * in * out`` FLOPs, scaled by its density ``S = n / m`` when it is N:M sparse, and
the attention einsums (logits and attend, ``2 * 2 * T^2 * hidden`` per layer) stay dense. Here
each kernel (a parameter whose name ends in ``kernel``) is one multiply, applied to as many
tokens as ``tokens`` says for its path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from nm_sparse_jax.policy import Policy, path_str

__all__ = ["FlopsReport", "attention_einsum_flops", "inference_flops"]


class FlopsReport(NamedTuple):
  """Inference FLOPs per example, dense and with the policy's target patterns."""

  dense: float
  sparse: float
  by_kernel: Mapping[str, tuple[float, float]]  # path -> (dense, sparse)

  @property
  def saved(self) -> float:
    """Fraction of the dense FLOPs that N:M sparsity removes."""
    return 1.0 - self.sparse / self.dense if self.dense else 0.0


def attention_einsum_flops(*, tokens: int, hidden: int, layers: int) -> float:
  """FLOPs of the attention logits and attend einsums: ``layers * 2 * (2 * T^2 * hidden)``.

  >>> round(attention_einsum_flops(tokens=196, hidden=768, layers=12) / 1e9, 3)  # ViT-Base
  1.416

  (Table 17 lists 0.7 GFLOPs for each of the two einsums of ViT-Base.)
  """
  return float(layers * 2 * (2 * tokens * tokens * hidden))


def inference_flops(
  params: Any,
  policy: Policy | None,
  *,
  tokens: int | Callable[[str], int],
  extra_dense_flops: float = 0.0,
) -> FlopsReport:
  """Inference FLOPs per example of the kernels in ``params``, dense and N:M sparse.

  Args:
    params: the parameter tree.
    policy: the sparsity policy (its targets' densities ``n / m``); None for dense.
    tokens: the number of tokens each kernel multiplies, or a function of its path.
    extra_dense_flops: FLOPs that sparsity does not change (e.g. :func:`attention_einsum_flops`).

  Returns:
    A :class:`FlopsReport`.

  >>> import numpy as np
  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> params = {"ff": {"kernel": np.zeros((4, 16))}, "out": {"kernel": np.zeros((16, 4))}}
  >>> pol = nmp.Policy([nmp.Rule("ff/kernel", "1:4")], recipes.ste())
  >>> r = inference_flops(params, pol, tokens=10)
  >>> r.dense, r.sparse, round(r.saved, 3)
  (2560.0, 1600.0, 0.375)
  """
  plan = policy.resolve(params) if policy is not None else None
  by_kernel = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    if not name.endswith("kernel"):
      continue
    count = tokens(name) if callable(tokens) else tokens
    dense = 2.0 * count * math.prod(leaf.shape)
    target = plan.targets.get(name) if plan is not None else None
    density = target.nm.density if target is not None and target.patterns else 1.0
    by_kernel[name] = (dense, dense * density)
  dense_total = sum(d for d, _ in by_kernel.values()) + extra_dense_flops
  sparse_total = sum(s for _, s in by_kernel.values()) + extra_dense_flops
  return FlopsReport(dense=dense_total, sparse=sparse_total, by_kernel=by_kernel)

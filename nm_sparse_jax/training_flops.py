"""Training FLOPs of a sparse-training run, step by step and per phase (the paper's Fig. 4b).

The paper plots accuracy against training FLOPs but does not define them; this module counts
them as follows (the convention of RigL, Evci et al. 2020, extended to decaying recipes). Per
example and training step ``j``, every kernel (a parameter whose name ends in ``kernel``, as in
:func:`nm_sparse_jax.flops.inference_flops`) is one matrix multiply of ``F = 2 * tokens * size``
dense FLOPs, and the step costs three multiplies per kernel:

* forward ``X @ W~``: ``rho_fwd(j) * F``, where ``rho_fwd`` is the density of ``W~`` as an
  operand: 1 in a dense phase and wherever ``D(j) > 0`` (MDGF's decaying ``W~`` has no zeros),
  else ``n_j / m_j`` of the pattern in use (SR-STE, SDGF intervals, fine-tuning, MDGF-Linear once
  ``D = 0``);
* input gradient ``dY @ W~^T``: ``rho_fwd(j) * F`` (it multiplies the same ``W~``);
* weight gradient ``X^T @ dY``: ``rho_grad(j) * F``, with ``rho_grad = 1`` when pruned weights
  receive a gradient -- dense phase, SR-STE/STE's straight-through sparsification phase, MDGF
  while ``D > 0``, any ``gradient="straight_through"`` recipe -- and ``n_j / m_j`` when only kept
  weights do (SDGF's autodiff gradient ``g * Phi``, every fine-tune phase).

So a dense step costs ``3F`` ("backward = 2x forward"), an SR-STE step ``2 rho F + F``. Kernels
that no rule makes sparse cost ``3F``; ``extra_dense_flops`` (e.g. the attention einsums of
:func:`nm_sparse_jax.flops.attention_einsum_flops`) count ``3x`` as well. Not counted:
elementwise work (masks, norms, softmax, activations), the optimizer update, and the fact that
the first layer needs no input gradient. These are the FLOPs that N:M hardware could skip; on
dense hardware every step costs the dense amount.

>>> import numpy as np
>>> from nm_sparse_jax import policy as nmp, recipes
>>> params = {"ff": {"kernel": np.zeros((8, 4))}}
>>> r = recipes.sr_ste(total_steps=4, dense_steps=1, fine_tune_steps=1)
>>> report = training_flops(params, nmp.Policy([nmp.Rule("ff", "1:8")], r), steps=4, tokens=1)
>>> report.forward.tolist(), report.backward.tolist()
([64.0, 8.0, 8.0, 8.0], [128.0, 72.0, 72.0, 16.0])
>>> report.by_phase()
{'dense': 192.0, 'decaying': 160.0, 'fine_tune': 24.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nm_sparse_jax.policy import Policy, path_str
from nm_sparse_jax.recipes import DENSE, FINE_TUNE, SPARSIFY, Recipe

__all__ = ["PHASE_NAMES", "TrainingFlops", "kernel_densities", "training_flops"]

PHASE_NAMES = {DENSE: "dense", SPARSIFY: "decaying", FINE_TUNE: "fine_tune"}


class TrainingFlops(NamedTuple):
  """Training FLOPs per example at every step.

  Attributes:
    forward: ``(steps,)`` forward FLOPs per example.
    backward: ``(steps,)`` input- and weight-gradient FLOPs per example.
    phase: ``(steps,)`` phase index (``recipes.DENSE``, ``SPARSIFY``, ``FINE_TUNE``) of each step.
    dense_step: FLOPs per example of one fully dense step (``3x`` the dense forward).
  """

  forward: np.ndarray
  backward: np.ndarray
  phase: np.ndarray
  dense_step: float

  @property
  def per_step(self) -> np.ndarray:
    """Forward plus backward FLOPs per example of each step."""
    return self.forward + self.backward

  def cumulative(self, batch: int = 1) -> np.ndarray:
    """Training FLOPs of steps ``0..j`` for ``batch`` examples per step: ``(steps,)``."""
    return np.cumsum(self.per_step) * batch

  def total(self, batch: int = 1) -> float:
    """All training FLOPs for ``batch`` examples per step."""
    return float(np.sum(self.per_step) * batch)

  def by_phase(self, batch: int = 1) -> dict[str, float]:
    """Training FLOPs of each phase, ``{"dense", "decaying", "fine_tune"}``."""
    return {
      name: float(np.sum(self.per_step[self.phase == index]) * batch)
      for index, name in PHASE_NAMES.items()
    }


def kernel_densities(recipe: Recipe, patterns, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """``(rho_fwd, rho_grad)`` of one kernel at steps ``0..steps-1`` (see the module docstring).

  >>> from nm_sparse_jax import recipes
  >>> r = recipes.mdgf_linear("1:4", total_steps=4, fine_tune_steps=1, decay_end=2)
  >>> [d.tolist() for d in kernel_densities(r, r.patterns(), 4)]
  [[1.0, 1.0, 0.25, 0.25], [1.0, 1.0, 0.25, 0.25]]
  """
  if not patterns:
    ones = np.ones(steps, np.float64)
    return ones, ones
  j = jnp.arange(steps, dtype=jnp.int32)
  branch = np.asarray(recipe.mask_branch(j, len(patterns)))
  density = np.array([1.0] + [p.density for p in patterns])[branch]
  decay = np.broadcast_to(np.asarray(recipe.decay(j)), (steps,))
  gets_pruned_gradient = (
    (decay > 0)
    | np.broadcast_to(np.asarray(recipe.straight_through(j)), (steps,))
    | (np.broadcast_to(np.asarray(recipe.refine(j)), (steps,)) > 0)
  )
  rho_fwd = np.where(decay > 0, 1.0, density)
  rho_grad = np.where(gets_pruned_gradient, 1.0, density)
  return rho_fwd, rho_grad


def training_flops(
  params: Any,
  policy: Policy | None,
  *,
  steps: int,
  tokens: int | Callable[[str], int],
  phases: Recipe | None = None,
  extra_dense_flops: float = 0.0,
) -> TrainingFlops:
  """Training FLOPs per example of each of ``steps`` steps with ``policy``.

  Args:
    params: the parameter tree (arrays or shape structs).
    policy: the sparsity policy, or None for dense training.
    steps: the number of training steps.
    tokens: tokens each kernel multiplies per example, or a function of its path.
    phases: the recipe whose phases label the steps; by default the recipe of the policy's
      first target (all steps are ``DENSE`` without one).
    extra_dense_flops: dense forward FLOPs per example outside the kernels (attention einsums).

  Returns:
    A :class:`TrainingFlops`.

  Raises:
    ValueError: anything ``policy.resolve`` rejects, or ``steps < 1``.
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  plan = policy.resolve(params) if policy is not None else None
  forward = np.full(steps, float(extra_dense_flops))
  backward = np.full(steps, 2.0 * extra_dense_flops)
  dense_forward = float(extra_dense_flops)
  first = None
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    if not name.endswith("kernel"):
      continue
    count = tokens(name) if callable(tokens) else tokens
    flops = 2.0 * count * math.prod(np.shape(leaf))
    dense_forward += flops
    target = plan.targets.get(name) if plan is not None else None
    if target is None:
      forward += flops
      backward += 2.0 * flops
      continue
    first = first or target
    rho_fwd, rho_grad = kernel_densities(target.recipe, target.patterns, steps)
    forward += rho_fwd * flops
    backward += (rho_fwd + rho_grad) * flops
  if phases is None and first is not None:
    phases = first.recipe
  if phases is None:
    phase = np.full(steps, DENSE, np.int32)
  else:
    phase = np.asarray(phases.phase(jnp.arange(steps, dtype=jnp.int32)), np.int32)
  return TrainingFlops(forward, backward, phase, 3.0 * dense_forward)

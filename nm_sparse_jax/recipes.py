"""Sparse training recipes: dense, STE, SR-STE, MDGF-Linear/Exponential, SDGF-Stepwise/Geometric.

A recipe is a small immutable :class:`Recipe` built by a factory of this module. It fixes, as
functions of the training step ``j`` (a traced int32), everything :func:`nm_sparse_jax.sparsify`
needs to compute the paper's (Bambhaniya et al., "Progressive Gradient Flow for Robust N:M
Sparsity Training in Transformers", §3) sparse weight

    W~ = W * (Phi(W, j) + D(j) * (1 - Phi(W, j)))

Training is split into three phases by step ``j``, with ``d = dense_steps``,
``s = fine_tune_steps`` and ``T = total_steps``:

* dense ``[0, d)``: ``Phi = 1``, ``W~ = W``;
* sparsification ``[d, T - s)``: the recipe's own rule (below);
* fine-tune ``[T - s, T)`` (and any later step): ``Phi`` is the target N:M mask, ``D = 0``.

The recipes' sparsification phases (``j' = j - d``, ``L = T - s - d``):

* ``mdgf_linear``: ``Phi`` = target N:M mask of ``W`` (recomputed every step),
  ``D(j) = max(1 - beta * j', 0)``.
* ``mdgf_exponential``: the same ``Phi``, ``D(j) = exp(-beta * j')``.
* ``sdgf_stepwise``: ``D = 0``; ``L`` is split evenly into intervals with the patterns
  ``(M-1):M, (M/2):M, (M/4):M, ..., N:M`` (integer halving, stopping before a value ``<= N``;
  1:8 gives 7:8, 4:8, 2:8, 1:8; 3:8 gives 7:8, 4:8, 3:8; 1:6 gives 5:6, 3:6, 1:6).
* ``sdgf_geometric``: ``D = 0``; intervals with ``(k*N):(k*M)``, ``k`` (a power of two) halving
  down to 1 (k=16 and 1:8 give 16:128, 8:64, 4:32, 2:16, 1:8). Where ``k*M`` does not divide
  the weight's contraction axis, the schedule starts at the largest ``k`` of that halving
  sequence whose group fits, and a warning names the weight (``fit_k="error"`` raises instead).
* ``sr_ste`` / ``ste``: forward ``W * Phi``; backward ``g + lambda_w * (1 - Phi) * W`` (SR-STE,
  Zhou et al. 2021) or ``g`` (STE, ``lambda_w = 0``). Optional dense phase ("10K dense").
* ``dense``: ``W~ = W`` always.

Gradients. MDGF and SDGF default to ``gradient="autodiff"``: the gradient of the product above,
``dW = g * (Phi + D * (1 - Phi))``, so pruned weights get D-scaled gradients that shrink with
``D`` ("progressively restrict the flow of gradients"). ``gradient="straight_through"`` passes
``g`` unchanged in every phase, as the authors' PyTorch code does. In the fine-tune phase the
autodiff gradient is ``g * Phi``: pruned weights get none. SR-STE and STE use their own rule in
the sparsification phase and ``g * Phi`` in the fine-tune phase.

Intervals: pattern ``i`` of ``P`` is used for ``j'`` in ``[ceil(i*L/P), ceil((i+1)*L/P))``,
i.e. ``i = floor(j' * P / L)``; interval lengths differ by at most one step.

>>> r = mdgf_exponential(total_steps=1000, dense_steps=100, fine_tune_steps=200, beta=0.01)
>>> [round(float(r.decay(j)), 4) for j in (0, 100, 200, 799, 800)]
[1.0, 1.0, 0.3679, 0.0009, 0.0]
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nm_sparse_jax._masks import NM, parse_nm

__all__ = [
  "DENSE",
  "FINE_TUNE",
  "RECIPE_NAMES",
  "SPARSIFY",
  "Recipe",
  "dense",
  "get",
  "mdgf_exponential",
  "mdgf_linear",
  "sdgf_geometric",
  "sdgf_stepwise",
  "sr_ste",
  "ste",
]

# Phase indices returned by Recipe.phase.
DENSE, SPARSIFY, FINE_TUNE = 0, 1, 2

# MDGF-Exponential never reaches zero; a beta derived from `decay_end` makes D reach this value
# there (the fine-tune phase then sets D = 0).
EXPONENTIAL_END_VALUE = 1e-3

GRADIENTS = ("autodiff", "straight_through")
RECIPE_NAMES = (
  "dense",
  "ste",
  "sr_ste",
  "mdgf_linear",
  "mdgf_exponential",
  "sdgf_stepwise",
  "sdgf_geometric",
)
_MDGF = ("mdgf_linear", "mdgf_exponential")
_SDGF = ("sdgf_stepwise", "sdgf_geometric")
_STE = ("ste", "sr_ste")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An immutable sparse-training recipe; build one with a factory of this module.

  Attributes:
    name: one of :data:`RECIPE_NAMES`.
    nm: the target N:M pattern, or None until a policy rule sets it (:meth:`with_nm`).
    total_steps: ``T``; None only for dense, STE and SR-STE without a fine-tune phase.
    dense_steps: ``d``, length of the dense phase.
    fine_tune_steps: ``s``, length of the fine-tune phase.
    beta: MDGF decay rate (None for other recipes).
    lambda_w: SR-STE's regularisation weight (0 for STE and the others).
    k: SDGF-Geometric's starting multiplier.
    fit_k: SDGF-Geometric, when ``k*M`` does not divide an axis: "reduce" or "error".
    gradient: "autodiff" or "straight_through" (MDGF and SDGF).
  """

  name: str
  nm: NM | None = None
  total_steps: int | None = None
  dense_steps: int = 0
  fine_tune_steps: int = 0
  beta: float | None = None
  lambda_w: float = 0.0
  k: int = 1
  fit_k: str = "reduce"
  gradient: str = "autodiff"

  def __str__(self) -> str:
    return f"{self.name}({self.nm if self.nm else 'N:M unset'})"

  def with_nm(self, pattern: NM | str | Sequence[int]) -> Recipe:
    """This recipe with target ``pattern`` (``"1:8"``, ``(1, 8)`` or an :class:`NM`)."""
    return dataclasses.replace(self, nm=parse_nm(pattern))

  @property
  def sparsification_steps(self) -> int | None:
    """``L = T - s - d``, or None when the recipe has no total length."""
    if self.total_steps is None:
      return None
    return self.total_steps - self.fine_tune_steps - self.dense_steps

  # ---- Functions of the (traced) step. ---------------------------------------------------------

  def phase(self, step: jax.typing.ArrayLike) -> jax.Array:
    """The phase at ``step``: :data:`DENSE`, :data:`SPARSIFY` or :data:`FINE_TUNE` (int32)."""
    step = jnp.asarray(step, jnp.int32)
    phase = jnp.where(step < self.dense_steps, DENSE, SPARSIFY)
    if self.total_steps is not None:
      phase = jnp.where(step >= self.total_steps - self.fine_tune_steps, FINE_TUNE, phase)
    return phase.astype(jnp.int32)

  def decay(self, step: jax.typing.ArrayLike) -> jax.Array:
    """``D(j)`` (float32): 1 in the dense phase, the MDGF decay, 0 otherwise.

    >>> r = mdgf_linear(total_steps=100, dense_steps=10, fine_tune_steps=10, beta=0.02)
    >>> [float(r.decay(j)) for j in (5, 10, 35, 60, 89, 90)]
    [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    """
    step = jnp.asarray(step, jnp.int32)
    phase = self.phase(step)
    elapsed = (step - self.dense_steps).astype(jnp.float32)
    if self.name == "mdgf_linear":
      sparse_decay = jnp.maximum(1.0 - self.beta * elapsed, 0.0)
    elif self.name == "mdgf_exponential":
      sparse_decay = jnp.exp(-self.beta * elapsed)
    else:
      sparse_decay = jnp.zeros((), jnp.float32)
    return jnp.where(phase == DENSE, 1.0, jnp.where(phase == SPARSIFY, sparse_decay, 0.0))

  def interval(self, step: jax.typing.ArrayLike, num_patterns: int) -> jax.Array:
    """Index of the pattern in use during the sparsification phase: ``floor(j' * P / L)``.

    Clipped to ``[0, P - 1]``, so it is 0 before and ``P - 1`` after that phase.
    """
    step = jnp.asarray(step, jnp.int32)
    length = self.sparsification_steps
    if num_patterns == 1 or not length:
      return jnp.zeros((), jnp.int32)
    elapsed = jnp.clip(step - self.dense_steps, 0, length - 1)
    return (elapsed * num_patterns // length).astype(jnp.int32)

  def mask_branch(self, step: jax.typing.ArrayLike, num_patterns: int) -> jax.Array:
    """Which mask applies at ``step``: 0 = all ones (dense), ``i + 1`` = pattern ``i``."""
    phase = self.phase(step)
    sparse = 1 + self.interval(step, num_patterns)
    return jnp.where(phase == DENSE, 0, jnp.where(phase == SPARSIFY, sparse, num_patterns))

  def straight_through(self, step: jax.typing.ArrayLike) -> jax.Array:
    """Whether the backward pass passes the incoming gradient unchanged at ``step`` (bool)."""
    phase = self.phase(step)
    if self.name in _STE:
      return phase == SPARSIFY
    return jnp.asarray(self.gradient == "straight_through")

  def refine(self, step: jax.typing.ArrayLike) -> jax.Array:
    """SR-STE's ``lambda_w`` during the sparsification phase, else 0 (float32)."""
    if self.lambda_w == 0.0:
      return jnp.zeros((), jnp.float32)
    return jnp.where(self.phase(step) == SPARSIFY, self.lambda_w, 0.0).astype(jnp.float32)

  # ---- Static schedule of patterns. ------------------------------------------------------------

  def patterns(self, axis_size: int | None = None, *, where: str = "weight") -> tuple[NM, ...]:
    """The N:M patterns of the sparsification phase, in order; the target is last.

    Args:
      axis_size: size of the weight's contraction axis; SDGF-Geometric fits ``k`` to it.
      where: the weight's name, for messages.

    Returns:
      ``()`` for dense, ``(target,)`` for STE, SR-STE and MDGF, the SDGF sequence otherwise.

    Raises:
      ValueError: the target is unset or does not divide ``axis_size``; an SDGF-Geometric
        pattern does not fit and ``fit_k="error"``; the sparsification phase is shorter than
        the number of patterns.

    >>> sdgf_stepwise(nm="1:8", total_steps=100).patterns()
    (NM(n=7, m=8), NM(n=4, m=8), NM(n=2, m=8), NM(n=1, m=8))
    >>> [str(p) for p in sdgf_geometric(nm="1:8", total_steps=100).patterns(1024)]
    ['16:128', '8:64', '4:32', '2:16', '1:8']
    """
    if self.name == "dense":
      return ()
    if self.nm is None:
      raise ValueError(f"{where}: recipe {self.name} has no target N:M; set nm= or use a policy")
    n, m = self.nm
    if axis_size is not None and axis_size % m:
      raise ValueError(f"{where}: contraction axis has size {axis_size}, not divisible by m={m}")
    if self.name == "sdgf_stepwise":
      ns = [m - 1] + [m >> d for d in range(1, m.bit_length()) if (m >> d) > n]
      seq = tuple(NM(v, m) for v in sorted(set(ns) | {n}, reverse=True) if v >= n)
    elif self.name == "sdgf_geometric":
      ks = [self.k >> d for d in range(self.k.bit_length())]
      fitting = [k for k in ks if axis_size is None or axis_size % (k * m) == 0]
      if fitting[0] != self.k:
        message = (
          f"{where}: SDGF-Geometric pattern {self.k * n}:{self.k * m} does not fit the "
          f"contraction axis of size {axis_size}"
        )
        if self.fit_k == "error":
          raise ValueError(message + " (fit_k='error')")
        warnings.warn(f"{message}; starting at k={fitting[0]} instead of k={self.k}", stacklevel=3)
      seq = tuple(NM(k * n, k * m) for k in fitting)
    else:
      seq = (self.nm,)
    length = self.sparsification_steps
    if self.name in _SDGF and length is not None and length < len(seq):
      raise ValueError(
        f"{where}: {self.name} needs at least one step per pattern, but its sparsification "
        f"phase has {length} steps for {len(seq)} patterns ({', '.join(map(str, seq))})"
      )
    return seq


# ---- Validation helpers. ---------------------------------------------------------------------


def _check_int(name: str, value, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int,)) and not hasattr(value, "__index__"):
    raise ValueError(f"{name}={value!r} must be an integer")
  value = int(value)
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}")
  return value


def _phases(total_steps, dense_steps, fine_tune_steps, *, total_required: bool):
  dense_steps = _check_int("dense_steps", dense_steps, minimum=0)
  fine_tune_steps = _check_int("fine_tune_steps", fine_tune_steps, minimum=0)
  if total_steps is None:
    if total_required or fine_tune_steps:
      raise ValueError("total_steps is required (the phases are placed relative to it)")
    return None, dense_steps, fine_tune_steps
  total_steps = _check_int("total_steps", total_steps, minimum=1)
  if dense_steps + fine_tune_steps > total_steps:
    raise ValueError(
      f"dense_steps + fine_tune_steps = {dense_steps} + {fine_tune_steps} exceeds "
      f"total_steps={total_steps}"
    )
  return total_steps, dense_steps, fine_tune_steps


def _target(nm) -> NM | None:
  return None if nm is None else parse_nm(nm, name="nm")


def _gradient(gradient: str) -> str:
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient={gradient!r} must be one of {GRADIENTS}")
  return gradient


# ---- Factories. ------------------------------------------------------------------------------


def dense(
  nm=None, *, total_steps: int | None = None, dense_steps: int = 0, fine_tune_steps: int = 0
) -> Recipe:
  """No sparsity: ``W~ = W`` at every step (the baseline).

  It takes the same target and phase arguments as the other factories, so that
  ``get(name, **same_arguments)`` builds every recipe of a comparison; they are validated and
  recorded, and change nothing.

  >>> dense("1:8", total_steps=100).patterns()
  ()
  """
  total_steps, dense_steps, fine_tune_steps = _phases(
    total_steps, dense_steps, fine_tune_steps, total_required=False
  )
  return Recipe(
    name="dense",
    nm=_target(nm),
    total_steps=total_steps,
    dense_steps=dense_steps,
    fine_tune_steps=fine_tune_steps,
  )


def sr_ste(
  nm=None,
  *,
  lambda_w: float = 2e-4,
  total_steps: int | None = None,
  dense_steps: int = 0,
  fine_tune_steps: int = 0,
) -> Recipe:
  """SR-STE (Zhou et al., 2021): forward ``W * Phi``, backward ``g + lambda_w * (1 - Phi) * W``.

  Args:
    nm: target N:M (``"1:8"``, ``(1, 8)``); may be left for a policy rule to set.
    lambda_w: the sparse-refined regulariser's weight (2e-4 in the paper and its code); >= 0.
    total_steps: needed only with a fine-tune phase.
    dense_steps: optional dense phase (the paper's Table 12 "10K dense").
    fine_tune_steps: optional final phase with gradient ``g * Phi``.

  Raises:
    ValueError: a negative ``lambda_w`` or phase length, or phases longer than ``total_steps``.

  >>> r = sr_ste("2:4", dense_steps=10_000)
  >>> r.name, str(r.nm), r.lambda_w, [int(r.phase(j)) for j in (9_999, 10_000)]
  ('sr_ste', '2:4', 0.0002, [0, 1])
  """
  if not lambda_w >= 0:
    raise ValueError(f"lambda_w={lambda_w} must be >= 0")
  total_steps, dense_steps, fine_tune_steps = _phases(
    total_steps, dense_steps, fine_tune_steps, total_required=False
  )
  return Recipe(
    name="sr_ste" if lambda_w else "ste",
    nm=_target(nm),
    total_steps=total_steps,
    dense_steps=dense_steps,
    fine_tune_steps=fine_tune_steps,
    lambda_w=float(lambda_w),
  )


def ste(
  nm=None, *, total_steps: int | None = None, dense_steps: int = 0, fine_tune_steps: int = 0
) -> Recipe:
  """Straight-through estimator: forward ``W * Phi``, backward ``g`` (SR-STE with lambda_w=0).

  >>> ste("1:4").name
  'ste'
  """
  return sr_ste(
    nm,
    lambda_w=0.0,
    total_steps=total_steps,
    dense_steps=dense_steps,
    fine_tune_steps=fine_tune_steps,
  )


def _mdgf(name, nm, total_steps, dense_steps, fine_tune_steps, beta, decay_end, gradient) -> Recipe:
  total_steps, dense_steps, fine_tune_steps = _phases(
    total_steps, dense_steps, fine_tune_steps, total_required=True
  )
  if beta is not None and decay_end is not None:
    raise ValueError("give beta or decay_end, not both")
  if beta is None:
    end = total_steps - fine_tune_steps if decay_end is None else decay_end
    if isinstance(end, float):
      if not 0.0 < end <= 1.0:
        raise ValueError(f"decay_end={end} as a fraction of total_steps must be in (0, 1]")
      end = round(end * total_steps)
    if not dense_steps < end <= total_steps:
      raise ValueError(
        f"decay_end={end} must lie after the dense phase (dense_steps={dense_steps}) and at "
        f"most at total_steps={total_steps}"
      )
    length = end - dense_steps
    beta = 1.0 / length if name == "mdgf_linear" else math.log(1.0 / EXPONENTIAL_END_VALUE) / length
  if not beta > 0:
    raise ValueError(f"beta={beta} must be > 0")
  return Recipe(
    name=name,
    nm=_target(nm),
    total_steps=total_steps,
    dense_steps=dense_steps,
    fine_tune_steps=fine_tune_steps,
    beta=float(beta),
    gradient=_gradient(gradient),
  )


def mdgf_linear(
  nm=None,
  *,
  total_steps: int,
  dense_steps: int = 0,
  fine_tune_steps: int = 0,
  beta: float | None = None,
  decay_end: int | float | None = None,
  gradient: str = "autodiff",
) -> Recipe:
  """MDGF-Linear: ``W~ = W * (Phi + D * (1 - Phi))`` with ``D(j) = max(1 - beta * j', 0)``.

  Args:
    nm: target N:M; may be left for a policy rule to set.
    total_steps: ``T``.
    dense_steps: ``d``.
    fine_tune_steps: ``s``.
    beta: decay rate, > 0. Leave None to derive it from ``decay_end``.
    decay_end: the step (int) or fraction of ``T`` (float, the paper recommends about 0.7) at
      which ``D`` reaches 0: ``beta = 1 / (decay_end - d)``. Defaults to ``T - s``.
    gradient: "autodiff" (``g * (Phi + D (1 - Phi))``) or "straight_through" (``g``).

  Raises:
    ValueError: ``beta <= 0``, ``d + s > T``, a negative phase, ``decay_end`` outside ``(d, T]``.

  >>> mdgf_linear("1:16", total_steps=1000, dense_steps=100, decay_end=0.7).beta
  0.0016666666666666668
  """
  return _mdgf(
    "mdgf_linear", nm, total_steps, dense_steps, fine_tune_steps, beta, decay_end, gradient
  )


def mdgf_exponential(
  nm=None,
  *,
  total_steps: int,
  dense_steps: int = 0,
  fine_tune_steps: int = 0,
  beta: float | None = None,
  decay_end: int | float | None = None,
  gradient: str = "autodiff",
) -> Recipe:
  """MDGF-Exponential: ``W~ = W * (Phi + D * (1 - Phi))`` with ``D(j) = exp(-beta * j')``.

  Args:
    nm: target N:M; may be left for a policy rule to set.
    total_steps: ``T``.
    dense_steps: ``d``.
    fine_tune_steps: ``s``.
    beta: decay rate, > 0. Leave None to derive it from ``decay_end``.
    decay_end: the step (int) or fraction of ``T`` (float) at which ``D`` reaches
      ``EXPONENTIAL_END_VALUE`` (1e-3): ``beta = ln(1000) / (decay_end - d)``. Defaults to
      ``T - s``, where the fine-tune phase sets ``D = 0``.
    gradient: "autodiff" or "straight_through".

  Raises:
    ValueError: as :func:`mdgf_linear`.

  >>> r = mdgf_exponential("1:32", total_steps=1000, decay_end=500)
  >>> round(float(r.decay(500)), 6)
  0.001
  """
  return _mdgf(
    "mdgf_exponential", nm, total_steps, dense_steps, fine_tune_steps, beta, decay_end, gradient
  )


def _sdgf(name, nm, total_steps, dense_steps, fine_tune_steps, gradient, **extra) -> Recipe:
  total_steps, dense_steps, fine_tune_steps = _phases(
    total_steps, dense_steps, fine_tune_steps, total_required=True
  )
  return Recipe(
    name=name,
    nm=_target(nm),
    total_steps=total_steps,
    dense_steps=dense_steps,
    fine_tune_steps=fine_tune_steps,
    gradient=_gradient(gradient),
    **extra,
  )


def sdgf_stepwise(
  nm=None,
  *,
  total_steps: int,
  dense_steps: int = 0,
  fine_tune_steps: int = 0,
  gradient: str = "autodiff",
) -> Recipe:
  """SDGF-Stepwise: ``D = 0``; patterns (M-1):M, M/2:M, M/4:M, ... down to N:M.

  The sparsification phase is split evenly among the patterns; see the module docstring for
  ``M/N`` that is not a power of two.

  >>> [str(p) for p in sdgf_stepwise("1:16", total_steps=100).patterns()]
  ['15:16', '8:16', '4:16', '2:16', '1:16']
  """
  return _sdgf("sdgf_stepwise", nm, total_steps, dense_steps, fine_tune_steps, gradient)


def sdgf_geometric(
  nm=None,
  *,
  total_steps: int,
  dense_steps: int = 0,
  fine_tune_steps: int = 0,
  k: int = 16,
  fit_k: str = "reduce",
  gradient: str = "autodiff",
) -> Recipe:
  """SDGF-Geometric: ``D = 0``; patterns (k*N):(k*M) with k halving down to 1 (N:M).

  Args:
    nm: target N:M.
    total_steps: ``T``.
    dense_steps: ``d``.
    fine_tune_steps: ``s``.
    k: starting multiplier (16 in the paper), a power of two; halved down to 1.
    fit_k: where ``k*M`` does not divide a weight's contraction axis: "reduce" starts at the
      largest ``k`` of the halving sequence that fits and warns; "error" raises.
    gradient: "autodiff" or "straight_through".

  >>> [str(p) for p in sdgf_geometric("2:4", total_steps=100, k=4).patterns()]
  ['8:16', '4:8', '2:4']
  """
  k = _check_int("k", k, minimum=1)
  if k & (k - 1):
    raise ValueError(f"k={k} must be a power of two (the patterns halve k down to 1)")
  if fit_k not in ("reduce", "error"):
    raise ValueError(f"fit_k={fit_k!r} must be 'reduce' or 'error'")
  return _sdgf(
    "sdgf_geometric", nm, total_steps, dense_steps, fine_tune_steps, gradient, k=k, fit_k=fit_k
  )


_FACTORIES = {
  "dense": dense,
  "ste": ste,
  "sr_ste": sr_ste,
  "mdgf_linear": mdgf_linear,
  "mdgf_exponential": mdgf_exponential,
  "sdgf_stepwise": sdgf_stepwise,
  "sdgf_geometric": sdgf_geometric,
}


def get(name: str, **kwargs) -> Recipe:
  """Builds the recipe called ``name`` with the factory's keyword arguments.

  Raises:
    ValueError: ``name`` is not one of :data:`RECIPE_NAMES`.

  >>> get("sdgf_geometric", nm="1:8", total_steps=500).patterns(128)[0]
  NM(n=16, m=128)
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPE_NAMES)}")
  return _FACTORIES[name](**kwargs)

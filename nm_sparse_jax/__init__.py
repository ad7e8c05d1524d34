"""nm_sparse_jax: N:M structured sparsity training for JAX, Flax and optax.

The pieces, one module each:

* :func:`nm_mask` (``_masks``) -- N:M magnitude masks along a kernel's contraction axis;
* :mod:`~nm_sparse_jax.recipes` -- dense, STE, SR-STE, MDGF-Linear/Exponential,
  SDGF-Stepwise/Geometric and their phase, decay and pattern schedules;
* :func:`sparsify` (``_sparsify``) -- the sparse weight ``W~`` of one kernel at a traced step,
  with each recipe's gradient;
* :mod:`~nm_sparse_jax.policy` -- which parameters, at which N:M, along which axis;
* :func:`nm_sparsity` (``transform``) -- the optax transformation (step counter, hard N:M
  fine-tuning);
* :mod:`~nm_sparse_jax.linen` -- running Flax linen models on ``W~``;
* :func:`finalize` / :func:`verify` (``finalize``) -- export and N:M verification;
* :mod:`~nm_sparse_jax.flops` -- inference FLOPs (the paper's Appendix D);
* :mod:`~nm_sparse_jax.diagnostics` / :mod:`~nm_sparse_jax.training_flops` -- gradient-flow
  diagnostics and training FLOPs per phase.

Optional layers, imported on their own: ``nm_sparse_jax.t5x`` (needs T5X),
``nm_sparse_jax.export`` / ``kernels`` / ``sparse_linear`` (GPU inference),
``nm_sparse_jax.experiments`` (the recipe comparison).
"""

from nm_sparse_jax import diagnostics, flops, linen, policy, recipes, training_flops
from nm_sparse_jax._masks import NM, nm_mask, parse_nm
from nm_sparse_jax._sparsify import sparsify
from nm_sparse_jax.finalize import VerifyReport, finalize, verify
from nm_sparse_jax.policy import Policy, Rule
from nm_sparse_jax.recipes import Recipe
from nm_sparse_jax.transform import NMSparsityState, nm_sparsity, sparsity_step

__version__ = "0.1.0"

__all__ = [
  "NM",
  "NMSparsityState",
  "Policy",
  "Recipe",
  "Rule",
  "VerifyReport",
  "diagnostics",
  "finalize",
  "flops",
  "linen",
  "nm_mask",
  "nm_sparsity",
  "parse_nm",
  "policy",
  "recipes",
  "sparsify",
  "sparsity_step",
  "training_flops",
  "verify",
]

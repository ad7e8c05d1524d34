"""T5X integration: N:M sparse training with ``python -m t5x.train`` and gin.

Importing this package needs ``t5x`` (with ``seqio``, ``tensorflow``, ``clu``); the core
``nm_sparse_jax`` package never imports it. The pieces:

* :func:`sparsify_model` (``_model``) -- ``MODEL = @nm_t5x.sparsify_model()``: the configured
  T5X model, running train/eval/score/decode on the sparse weights of the selected kernels;
* :func:`sparse_trainer` (``_trainer``) -- ``train_script.train.trainer_cls``: a trainer that
  hands the model the step relative to the start of training (resumable, microbatch-safe);
* :func:`t5_policy` -- the T5 1.1 policy from gin macros (FF pattern, attention pattern);
* the partition rule of :class:`~nm_sparse_jax.NMSparsityState` in
  ``t5x.optimizers.OptaxStatePartitionRules`` (``_optim``), registered on import;
* :mod:`~nm_sparse_jax.t5x.checkpoint` -- ``python -m nm_sparse_jax.t5x.checkpoint verify|export``.

Gin files using them are in the repository's ``gin/`` folder.
"""

from __future__ import annotations

import warnings

try:
  # T5X's own imports raise deprecation warnings under current JAX (jax.experimental.pjit, ...);
  # they are T5X's to fix, and would fail runs with warnings as errors (this project's pytest).
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import t5x  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
    "nm_sparse_jax.t5x needs T5X (github.com/google-research/t5x), which is not on PyPI; "
    "install it from source (see the README's T5X section)"
  ) from e

from nm_sparse_jax.policy import Policy, t5_1_1
from nm_sparse_jax.recipes import Recipe
from nm_sparse_jax.t5x._model import NMSparseModel, sparsify_model, sparsity_metrics
from nm_sparse_jax.t5x._optim import register_partition_rules
from nm_sparse_jax.t5x._trainer import NMSparseTrainer, sparse_trainer

__all__ = [
  "NMSparseModel",
  "NMSparseTrainer",
  "sparse_trainer",
  "sparsify_model",
  "sparsity_metrics",
  "t5_policy",
]

ATTENTION_LAYERS = ("q", "k", "v", "o", "qk", "qkv", "attention")


def t5_policy(
  recipe: Recipe,
  *,
  ff: str | None = None,
  attention: str | None = None,
  attention_layers: str = "qkv",
) -> Policy:
  """The T5 1.1 policy (:func:`nm_sparse_jax.policy.t5_1_1`) in the shape of gin macros.

  Args:
    recipe: the recipe of every sparse layer.
    ff: N:M of the MLP kernels (``wi``/``wi_0``/``wi_1``/``wo``), or None for dense.
    attention: N:M of the attention kernels named by ``attention_layers``, or None.
    attention_layers: which: "q", "k", "v", "o", "qk", "qkv" or "attention" (all four).

  Raises:
    ValueError: an unknown ``attention_layers``, or no sparse layer at all.

  >>> from nm_sparse_jax import recipes
  >>> p = t5_policy(recipes.sr_ste(), ff="1:8", attention="1:4", attention_layers="qk")
  >>> [(r.pattern, str(r.nm)) for r in p.rules][2:]
  [('attention/query/kernel$', '1:4'), ('attention/key/kernel$', '1:4')]
  """
  if attention_layers not in ATTENTION_LAYERS:
    raise ValueError(f"attention_layers={attention_layers!r} must be one of {ATTENTION_LAYERS}")
  return t5_1_1(recipe, ff=ff, **{attention_layers: attention})


register_partition_rules()

"""Partitioning of our optax state inside T5X's ``OptaxWrapper`` (``t5x.optimizers``).

T5X derives the logical axes of an optax state by looking up each ``...State`` NamedTuple in
``OptaxStatePartitionRules._RULES``; an unregistered one raises "Encountered unregistered optax
state type". :func:`register_partition_rules` (run when ``nm_sparse_jax.t5x`` is imported) adds
:class:`~nm_sparse_jax.NMSparsityState`: its ``count`` is a scalar, replicated (``None``).
"""

from __future__ import annotations

from t5x import optimizers

from nm_sparse_jax.transform import NMSparsityState

__all__ = ["nm_sparsity_state_axes", "register_partition_rules"]


def nm_sparsity_state_axes(state: NMSparsityState, params_axes) -> NMSparsityState:
  """Logical axes of an :class:`NMSparsityState`: the scalar ``count`` is replicated.

  >>> import jax.numpy as jnp
  >>> nm_sparsity_state_axes(NMSparsityState(count=jnp.zeros([], jnp.int32)), None)
  NMSparsityState(count=None)
  """
  del state, params_axes
  return NMSparsityState(count=None)


def register_partition_rules() -> None:
  """Registers :func:`nm_sparsity_state_axes` with ``t5x.optimizers.OptaxStatePartitionRules``.

  ``_RULES`` is private to T5X; this is the registration T5X's own comment invites ("add to this
  list to support additional optimizers / transformations") and what jaxpruner does too.
  """
  optimizers.OptaxStatePartitionRules._RULES[NMSparsityState] = nm_sparsity_state_axes

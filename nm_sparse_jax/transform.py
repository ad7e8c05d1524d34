"""The optax transformation: the training step counter, and hard N:M parameters when fine-tuning.

``nm_sparsity(policy)`` goes last in an ``optax.chain``. Its state is ``NMSparsityState(count)``:
the number of updates applied so far, which is the step ``j`` of the next forward pass. The
forward pass reads it (:func:`sparsity_step`) and runs the model on
``policy.apply(params, count)`` -- directly, through :class:`nm_sparse_jax.linen.Sparsified`, or
through :func:`nm_sparse_jax.linen.intercept`.

When the parameters an update produces belong to a selected kernel's fine-tune phase (step
``count + 1 >= T - s``), the update is changed so that the new kernel is exactly N:M along its
contraction axis: the pruned weights of ``Phi(W + u)`` get ``u = -W`` (they become exactly 0) and
the kept ones keep their update. The loop's parameters are then hard N:M from the fine-tune
phase on -- the mask is frozen unless a gradient lifts a pruned weight back above a kept one --
and the final parameters need no extra call after ``optax.apply_updates``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from nm_sparse_jax._masks import nm_mask
from nm_sparse_jax.policy import Policy, path_str

__all__ = ["NMSparsityState", "nm_sparsity", "sparsity_step"]


class NMSparsityState(NamedTuple):
  """State of :func:`nm_sparsity`: ``count`` (int32 scalar), the step of the next forward pass."""

  count: jax.Array


def nm_sparsity(policy: Policy, *, project_fine_tune: bool = True) -> optax.GradientTransformation:
  """A transformation that counts steps and keeps fine-tuned kernels exactly N:M.

  Place it last in ``optax.chain`` (after the optimizer and any learning-rate scaling), and
  pass ``params`` to ``update``.

  Args:
    policy: the :class:`~nm_sparse_jax.policy.Policy` the model's forward pass uses.
    project_fine_tune: make the parameters of kernels in their fine-tune phase exactly N:M (see
      the module docstring). Requires ``params`` in ``update``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`NMSparsityState`.

  Raises:
    ValueError: at ``init``, anything :meth:`Policy.resolve` rejects; at ``update``, missing
      ``params`` when projection is on.

  >>> import jax.numpy as jnp, optax
  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> pol = nmp.Policy([nmp.Rule("kernel", "1:2")], recipes.ste(total_steps=2))
  >>> tx = optax.chain(optax.sgd(0.1), nm_sparsity(pol))
  >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, -1.0]])}
  >>> state = tx.init(params)
  >>> updates, state = tx.update(params, state, params)  # step 0 -> 1 (fine-tune from step 2)
  >>> updates, state = tx.update(params, state, params)  # step 1 -> 2: projected onto 1:2
  >>> optax.apply_updates(params, updates)["kernel"]
  Array([[0. , 1.8],
         [2.7, 0. ]], dtype=float32)
  """

  def init_fn(params):
    policy.resolve(params)
    return NMSparsityState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    count = optax.safe_increment(state.count)
    if project_fine_tune:
      updates = _project_fine_tune(policy, updates, params, count)
    return updates, NMSparsityState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def _project_fine_tune(policy: Policy, updates: Any, params: Any, next_step: jax.Array) -> Any:
  """Updates whose result is exactly N:M for kernels whose fine-tune phase includes next_step."""
  if params is None:
    raise ValueError(
      "nm_sparsity(project_fine_tune=True) needs params: call tx.update(updates, state, params)"
    )
  plan = policy.resolve(params)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
  # The parameters' leaves in the updates' structure (raises if the two trees differ).
  param_leaves = treedef.flatten_up_to(params)
  # The fine-tune phase starts at T - s. One conditional per distinct start, so that no mask is
  # computed before it.
  groups: dict[int, list[int]] = {}
  for i, (path, _) in enumerate(leaves):
    target = plan.targets.get(path_str(path))
    if target is not None and target.patterns and target.recipe.total_steps is not None:
      start = target.recipe.total_steps - target.recipe.fine_tune_steps
      groups.setdefault(start, []).append(i)
  new_leaves = [u for _, u in leaves]
  for start, members in groups.items():

    def project(us, members=members):
      out = []
      for i, u in zip(members, us):
        target = plan.targets[path_str(leaves[i][0])]
        w = param_leaves[i]
        candidate = (w + u).astype(w.dtype)
        keep = nm_mask(candidate, target.nm.n, target.nm.m, axis=target.axes)
        out.append(jnp.where(keep, u, -w.astype(u.dtype)))
      return out

    current = [new_leaves[i] for i in members]
    projected = lax.cond(next_step >= start, project, lambda us: us, current)
    for i, u in zip(members, projected):
      new_leaves[i] = u
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def sparsity_step(opt_state: Any) -> jax.Array:
  """The ``count`` of the :class:`NMSparsityState` inside an optax state (e.g. a chain's).

  Raises:
    ValueError: the state holds no :class:`NMSparsityState`, or more than one.

  >>> import optax
  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> import jax.numpy as jnp
  >>> pol = nmp.Policy([nmp.Rule("w", "1:2")], recipes.ste())
  >>> state = optax.chain(optax.adam(1e-3), nm_sparsity(pol)).init({"w": jnp.ones((4, 2))})
  >>> int(sparsity_step(state))
  0
  """
  found = [
    s
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: isinstance(s, NMSparsityState))
    if isinstance(s, NMSparsityState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"expected one NMSparsityState in the optimizer state, found {len(found)}; add "
      "nm_sparse_jax.nm_sparsity(policy) to the optax chain once"
    )
  return found[0].count

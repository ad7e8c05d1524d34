"""Gradient-flow diagnostics per layer group (the paper's §4 and Fig. 3), for any training loop.

:func:`nm_diagnostics` builds a pair of pure functions, ``init`` and ``update``, in the manner of
an optax transformation. ``update`` runs inside the jitted training step and returns a flat dict
of scalar arrays (``"ff/grad_abs_var"``, ``"qkv/flip_rate"``, ...) that a loop, or T5X's metric
writer, can log, and a new :class:`NMDiagnosticsState`. For every layer group ``G`` (a set of
kernels chosen by regular expressions over parameter paths) and training step ``j``:

* ``G/grad_abs_var`` -- ``Var(|g|)`` over all elements of the group's gradients ``g`` (Fig. 3b);
* ``G/nu_var`` -- ``Var(nu)`` over the group's elements of Adam's second-moment estimate ``nu``
  (the ``ScaleByAdamState`` found in the optimizer state; Fig. 3a);
* ``G/flip_rate`` -- the fraction of elements of the mask in use, ``Phi(W_j, j)``, that differ
  from the previous call's ``Phi(W_{j-1}, j-1)`` (0 at the first call). It includes the flips an
  SDGF interval change causes;
* ``G/target_flip_rate`` -- the same for the *target* N:M mask of ``W`` (what the final sparse
  model would keep), for kernels with a target pattern -- also under the dense recipe, which
  shows how much that mask churns without any sparsity pressure;
* ``G/n``, ``G/m`` -- the N:M pattern of the interval in use (``n = m = 1`` when the mask is all
  ones: a dense phase, the dense recipe, or a group with no sparse kernel);
* ``G/decay`` -- ``D(j)`` (1 when the mask is all ones);
* ``G/mask_density`` -- ``mean(Phi)``; ``G/sparsity`` -- the fraction of exact zeros of
  ``W~ = W * (Phi + D * (1 - Phi))``, the weight the forward pass uses (0 during MDGF decay,
  where pruned weights are ``D * W``, not 0).

Variances are population variances pooled over every element of the group's kernels:
``Var(x) = mean((x - mean(x))^2)``. ``n``, ``m`` and ``decay`` are those of the group's first
sparse kernel (in parameter order); a group whose kernels follow different schedules should be
split. All shapes and dtypes of the state are fixed by the parameter tree, so the step never
recompiles.

>>> import jax, jax.numpy as jnp, optax
>>> from nm_sparse_jax import policy as nmp, recipes
>>> pol = nmp.Policy([nmp.Rule("w", "1:2")], recipes.sr_ste())
>>> diag = nm_diagnostics(pol)
>>> params = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0]])}
>>> tx = optax.adam(0.1)
>>> grads = {"w": jnp.array([[0.5, -1.0], [0.0, 2.0]])}
>>> opt_state = tx.update(grads, tx.init(params))[1]
>>> metrics, state = jax.jit(diag.update)(diag.init(params), params, grads, 0, opt_state)
>>> sorted(metrics)[:4]  # one group per policy rule
['rule_0/decay', 'rule_0/flip_rate', 'rule_0/grad_abs_var', 'rule_0/m']
>>> [round(float(metrics[f"rule_0/{k}"]), 6) for k in ("grad_abs_var", "sparsity", "n", "m")]
[0.546875, 0.5, 1.0, 2.0]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from nm_sparse_jax._masks import nm_mask
from nm_sparse_jax.policy import LAYER_GROUPS, Policy, SparsityPlan, Target, group_members, path_str

__all__ = [
  "METRICS",
  "NMDiagnostics",
  "NMDiagnosticsState",
  "active_mask",
  "adam_nu",
  "flip_rate",
  "layer_groups",
  "nm_diagnostics",
  "pooled_variance",
  "zero_fraction",
]

# The metric names of every group, in the order they are documented above.
METRICS = (
  "grad_abs_var",
  "nu_var",
  "flip_rate",
  "target_flip_rate",
  "n",
  "m",
  "decay",
  "mask_density",
  "sparsity",
)
# Group names made of several groups of policy.LAYER_GROUPS.


class NMDiagnosticsState(NamedTuple):
  """State of :func:`nm_diagnostics`.

  Attributes:
    count: int32 scalar, the number of ``update`` calls so far.
    active: path -> bool mask in use at the previous call, for every tracked kernel.
    target: path -> bool target N:M mask at the previous call, for kernels with a target.
  """

  count: jax.Array
  active: dict[str, jax.Array]
  target: dict[str, jax.Array]


class NMDiagnostics(NamedTuple):
  """The two functions of :func:`nm_diagnostics`.

  Attributes:
    init: ``params -> NMDiagnosticsState``.
    update: ``(state, params, grads, step, opt_state=None) -> (metrics, state)``.
  """

  init: Callable[[Any], NMDiagnosticsState]
  update: Callable[..., tuple[dict[str, jax.Array], NMDiagnosticsState]]


# ---- Small pure functions. -------------------------------------------------------------------


def pooled_variance(xs: Sequence[jax.typing.ArrayLike]) -> jax.Array:
  """Population variance of all elements of ``xs`` together, in float32 (two passes).

  ``Var = sum_i sum((x_i - mu)^2) / N`` with ``mu = sum_i sum(x_i) / N``, ``N = sum_i size(x_i)``.

  >>> float(pooled_variance([jnp.array([1.0, 2.0]), jnp.array([[3.0, 4.0]])]))
  1.25
  """
  xs = [jnp.asarray(x, jnp.float32) for x in xs]
  count = float(sum(x.size for x in xs))
  mean = sum(jnp.sum(x) for x in xs) / count
  return sum(jnp.sum(jnp.square(x - mean)) for x in xs) / count


def zero_fraction(xs: Sequence[jax.typing.ArrayLike]) -> jax.Array:
  """Fraction of exact zeros among all elements of ``xs`` (float32).

  >>> float(zero_fraction([jnp.array([0.0, 1.0]), jnp.zeros((2, 1))]))
  0.75
  """
  count = float(sum(jnp.size(x) for x in xs))
  zeros = sum(jnp.sum(jnp.asarray(x) == 0, dtype=jnp.int32) for x in xs)
  return zeros.astype(jnp.float32) / count


def _true_fraction(masks: Sequence[jax.Array]) -> jax.Array:
  count = float(sum(x.size for x in masks))
  return sum(jnp.sum(x, dtype=jnp.int32) for x in masks).astype(jnp.float32) / count


def flip_rate(previous: Sequence[jax.Array], current: Sequence[jax.Array]) -> jax.Array:
  """Fraction of mask bits that differ between ``previous`` and ``current`` (float32).

  >>> before, after = jnp.array([True, False, True, True]), jnp.array([True, True, True, False])
  >>> float(flip_rate([before], [after]))
  0.5
  """
  count = float(sum(c.size for c in current))
  flips = sum(jnp.sum(p != c, dtype=jnp.int32) for p, c in zip(previous, current))
  return flips.astype(jnp.float32) / count


def active_mask(w: jax.Array, target: Target, step: jax.typing.ArrayLike) -> jax.Array:
  """The mask ``Phi(W, j)`` that ``target``'s recipe applies to ``w`` at ``step``.

  All ones in a dense phase (and for the dense recipe), the N:M mask of the interval in use
  (along the target's contraction axis) otherwise: the mask of
  :func:`nm_sparse_jax.sparsify` at ``step``.

  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> w = jnp.array([[1.0, -4.0], [-2.0, 3.0]])
  >>> plan = nmp.Policy([nmp.Rule("w", "1:2")], recipes.ste(dense_steps=5)).resolve({"w": w})
  >>> [active_mask(w, plan["w"], j).astype(int).tolist() for j in (4, 5)]
  [[[1, 1], [1, 1]], [[0, 1], [1, 0]]]
  """
  ones = lambda v: jnp.ones(v.shape, jnp.bool_)  # noqa: E731
  if not target.patterns:
    return ones(w)
  branches = [ones] + [
    lambda v, p=p: nm_mask(v, p.n, p.m, axis=target.axes) for p in target.patterns
  ]
  branch = target.recipe.mask_branch(step, len(target.patterns))
  return lax.switch(branch, branches, lax.stop_gradient(w))


def _pattern(target: Target | None, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(n, m, D)`` in use at ``step``: ``(1, 1, 1)`` where the mask is all ones."""
  if target is None or not target.patterns:
    return jnp.ones((), jnp.int32), jnp.ones((), jnp.int32), jnp.ones((), jnp.float32)
  branch = target.recipe.mask_branch(step, len(target.patterns))
  ns = jnp.array([1] + [p.n for p in target.patterns], jnp.int32)
  ms = jnp.array([1] + [p.m for p in target.patterns], jnp.int32)
  decay = jnp.where(branch == 0, 1.0, target.recipe.decay(step))
  return ns[branch], ms[branch], decay.astype(jnp.float32)


def adam_nu(opt_state: Any) -> Any | None:
  """Adam's second-moment tree ``nu`` from the ``ScaleByAdamState`` inside ``opt_state``.

  ``optax.adam``, ``adamw``, ``nadam``, ``lamb`` and chains holding them have one. Returns None
  when the state has none (e.g. SGD, Adafactor).

  Raises:
    ValueError: the state holds more than one ``ScaleByAdamState``.

  >>> state = optax.adamw(1e-3).init({"w": jnp.ones(2)})
  >>> adam_nu(state)
  {'w': Array([0., 0.], dtype=float32)}
  """
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  if len(found) > 1:
    raise ValueError(
      f"found {len(found)} ScaleByAdamState in the optimizer state; pass the one to read"
    )
  return found[0].nu if found else None


def _by_path(tree: Any) -> dict[str, Any]:
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---- Groups. ---------------------------------------------------------------------------------


def layer_groups(naming: str, names: Sequence[str] = ("ff", "qkv")) -> dict[str, tuple[str, ...]]:
  """Group name -> path regexes for a known model naming (a key of ``policy.LAYER_GROUPS``).

  Group names are those of ``LAYER_GROUPS[naming]`` (``ff``, ``q``, ``k``, ``v``, ``o``) and the
  aliases ``qk``, ``qkv`` and ``attention``.

  Raises:
    ValueError: an unknown naming or group name.

  >>> layer_groups("t5_1_1", ["ff"])
  {'ff': ('mlp/wi(_\\\\d+)?/kernel$', 'mlp/wo/kernel$')}
  """
  return {
    name: tuple(
      regex for member in group_members(naming, name) for regex, _ in LAYER_GROUPS[naming][member]
    )
    for name in names
  }


def _members(groups: Mapping[str, Sequence[str]], paths: Sequence[str]) -> dict[str, list[str]]:
  members = {}
  for name, regexes in groups.items():
    if "/" in name:
      raise ValueError(f"group name {name!r} must not contain '/'")
    regexes = (regexes,) if isinstance(regexes, str) else tuple(regexes)
    for regex in regexes:
      try:
        re.compile(regex)
      except re.error as e:
        raise ValueError(f"group {name!r}: {regex!r} is not a regular expression: {e}") from None
    chosen = [p for p in paths if any(re.search(r, p) for r in regexes)]
    if not chosen:
      shown = ", ".join(paths[:12]) + (f", ... ({len(paths)} in all)" if len(paths) > 12 else "")
      raise ValueError(
        f"group {name!r} ({', '.join(regexes)}) matches no parameter; parameters: {shown}"
      )
    members[name] = chosen
  return members


# ---- The diagnostics. ------------------------------------------------------------------------


def nm_diagnostics(
  policy: Policy, *, groups: Mapping[str, str | Sequence[str]] | None = None
) -> NMDiagnostics:
  """Per-group gradient-flow diagnostics of training with ``policy``; see the module docstring.

  Args:
    policy: the sparsity policy of the forward pass (its rules give the masks, ``D(j)`` and
      the target patterns). A policy whose recipe is ``dense`` gives dense-baseline metrics.
    groups: group name -> a regular expression (or several) searched in '/'-joined parameter
      paths. None: the policy's own groups (``Rule.group``: ``ff``, ``q``, ... for the presets,
      ``rule_<index>`` for rules without one; rules of the same group are merged).
      :func:`layer_groups` gives the groups of a known naming.

  Returns:
    :class:`NMDiagnostics` ``(init, update)``. ``update(state, params, grads, step,
    opt_state=None)`` takes the parameters ``W_j`` and gradients of the forward pass at step
    ``j`` (``sparsity_step`` of the optimizer state *before* the update), and the optimizer
    state to read ``nu`` from (typically the one *after* the update, whose ``nu`` includes this
    gradient); without an Adam state there is no ``nu_var``. It returns ``(metrics, state)``.

  Raises:
    ValueError: at ``init``/``update``, anything ``policy.resolve`` rejects, a group that matches
      no parameter, or a group name with '/'.
  """

  def resolve(params) -> tuple[SparsityPlan, dict[str, list[str]]]:
    plan = policy.resolve(params)
    if groups is not None:
      return plan, _members(dict(groups), plan.paths)
    by_rule: dict[str, list[str]] = {}
    for target in plan:
      by_rule.setdefault(target.group, []).append(target.path)
    return plan, by_rule

  def has_target(plan: SparsityPlan, path: str) -> bool:
    return path in plan and plan[path].nm is not None

  def target_mask(w, target: Target) -> jax.Array:
    return nm_mask(lax.stop_gradient(w), target.nm.n, target.nm.m, axis=target.axes)

  def init_fn(params) -> NMDiagnosticsState:
    plan, members = resolve(params)
    leaves = _by_path(params)
    tracked = sorted({p for paths in members.values() for p in paths})
    return NMDiagnosticsState(
      count=jnp.zeros([], jnp.int32),
      active={p: jnp.ones(jnp.shape(leaves[p]), jnp.bool_) for p in tracked},
      target={p: jnp.ones(jnp.shape(leaves[p]), jnp.bool_) for p in tracked if has_target(plan, p)},
    )

  def update_fn(state: NMDiagnosticsState, params, grads, step, opt_state=None):
    plan, members = resolve(params)
    step = jnp.asarray(step, jnp.int32)
    weights, gradients = _by_path(params), _by_path(grads)
    nu = adam_nu(opt_state) if opt_state is not None else None
    nus = _by_path(nu) if nu is not None else None
    first = state.count == 0
    active, target, w_tilde = {}, {}, {}
    for path in state.active:
      w = weights[path]
      t = plan.targets.get(path)
      active[path] = active_mask(w, t, step) if t is not None else jnp.ones(w.shape, jnp.bool_)
      decay = _pattern(t, step)[2].astype(w.dtype)
      w_tilde[path] = jnp.where(active[path], w, w * decay)
      if path in state.target:
        target[path] = target_mask(w, t)
    metrics = {}
    for name, paths in members.items():
      sparse = [p for p in paths if p in plan and plan[p].patterns]
      n, m, decay = _pattern(plan[sparse[0]] if sparse else None, step)
      group = {
        "grad_abs_var": pooled_variance([jnp.abs(gradients[p]) for p in paths]),
        "flip_rate": jnp.where(
          first, 0.0, flip_rate([state.active[p] for p in paths], [active[p] for p in paths])
        ),
        "n": n,
        "m": m,
        "decay": decay,
        "mask_density": _true_fraction([active[p] for p in paths]),
        "sparsity": zero_fraction([w_tilde[p] for p in paths]),
      }
      if nus is not None:
        group["nu_var"] = pooled_variance([nus[p] for p in paths])
      with_target = [p for p in paths if p in target]
      if with_target:
        rate = flip_rate([state.target[p] for p in with_target], [target[p] for p in with_target])
        group["target_flip_rate"] = jnp.where(first, 0.0, rate)
      metrics.update({f"{name}/{key}": group[key] for key in METRICS if key in group})
    new_state = NMDiagnosticsState(
      count=optax.safe_increment(state.count), active=active, target=target
    )
    return metrics, new_state

  return NMDiagnostics(init_fn, update_fn)

"""Which weights are sparse, at which N:M, with which recipe, along which contraction axis.

A :class:`Policy` is a list of :class:`Rule` s. Each rule is a regular expression searched
(``re.search``) in the '/'-joined path of every parameter (``"encoder/layers_0/mlp/wi_0/kernel"``),
with an N:M pattern, optionally its own recipe, and optionally the contraction axis. Resolving a
policy against a parameter tree (:meth:`Policy.resolve`) checks everything that can be checked
from shapes, before any step runs:

* every rule matches at least one parameter (else the error lists paths that exist);
* no parameter is claimed by two rules that disagree on pattern, recipe or axis;
* selected parameters are floating point, and their contraction axis is divisible by ``m``
  (and fits every SDGF pattern).

The contraction axis is the rule's ``axis`` when given; otherwise 0 for parameters of rank 1 or
2 (a Flax/T5X ``Dense`` kernel is ``(in, out)``); a kernel of higher rank needs an explicit axis,
which the presets give for the layouts they know.

Presets for known model naming take the N:M of each layer group, so "1:8 on FF + 1:4 on Q/K/V" is
one line:

>>> from nm_sparse_jax import recipes
>>> recipe = recipes.sdgf_stepwise(total_steps=100_000, dense_steps=10_000, fine_tune_steps=10_000)
>>> policy = t5_1_1(recipe, ff="1:8", qkv="1:4")
>>> [(r.pattern, str(r.nm)) for r in policy.rules][:2]
[('mlp/wi(_\\\\d+)?/kernel$', '1:8'), ('mlp/wo/kernel$', '1:8')]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nm_sparse_jax._masks import NM, contraction_axes, parse_nm
from nm_sparse_jax._sparsify import sparsify_with_patterns
from nm_sparse_jax.recipes import Recipe

__all__ = [
  "GROUP_ALIASES",
  "LAYER_GROUPS",
  "Policy",
  "Rule",
  "SparsityPlan",
  "Target",
  "from_groups",
  "group_members",
  "path_str",
  "t5_1_1",
  "vit",
]

Axis = int | tuple[int, ...]


class Rule(NamedTuple):
  """Selects parameters whose path matches ``pattern`` (``re.search``).

  Attributes:
    pattern: a regular expression over '/'-joined parameter paths.
    nm: the N:M pattern (``"1:8"``, ``(1, 8)``, :class:`NM`), or None to use the recipe's.
    recipe: the recipe for these parameters, or None for the policy's recipe.
    axis: the contraction axis (an int or a tuple of adjacent axes), or None to infer it.
    group: the layer group's name in metrics and reports (``"ff"``, ``"q"``, ...); None names
      the group after the rule (``"rule_<index>"``). Presets set it.
  """

  pattern: str
  nm: NM | str | tuple[int, int] | None = None
  recipe: Recipe | None = None
  axis: Axis | None = None
  group: str | None = None


class Target(NamedTuple):
  """How one selected parameter is sparsified (a resolved rule)."""

  path: str
  shape: tuple[int, ...]
  recipe: Recipe
  axes: tuple[int, ...]
  patterns: tuple[NM, ...]
  rule: int
  group: str

  @property
  def nm(self) -> NM:
    """The target N:M pattern."""
    return self.recipe.nm

  @property
  def axis_size(self) -> int:
    """Size of the (flattened) contraction axis."""
    return math.prod(self.shape[a] for a in self.axes)


def path_str(path: Sequence[Any]) -> str:
  """'/'-joins a ``jax.tree_util`` key path: ``(DictKey('mlp'), DictKey('wo'))`` -> ``'mlp/wo'``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
  """A policy resolved against one parameter tree: the :class:`Target` of each selected path."""

  targets: Mapping[str, Target]
  paths: tuple[str, ...]

  def __contains__(self, path: str) -> bool:
    return path in self.targets

  def __getitem__(self, path: str) -> Target:
    return self.targets[path]

  def __iter__(self):
    return iter(self.targets.values())

  def __len__(self) -> int:
    return len(self.targets)

  def describe(self) -> str:
    """A table of the selected parameters and their schedules."""
    rows = [("parameter", "group", "shape", "axis", "recipe", "target", "patterns")]
    for t in self:
      rows.append(
        (
          t.path,
          t.group,
          "x".join(map(str, t.shape)),
          ",".join(map(str, t.axes)),
          t.recipe.name,
          str(t.nm) if t.nm else "-",
          " > ".join(map(str, t.patterns)) or "dense",
        )
      )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _some_paths(paths: Sequence[str], limit: int = 12) -> str:
  shown = ", ".join(paths[:limit])
  return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


@dataclasses.dataclass(frozen=True)
class Policy:
  """Maps parameter paths to N:M targets; see the module docstring.

  Attributes:
    rules: the rules, in order.
    recipe: the recipe of rules that name none.
  """

  rules: tuple[Rule, ...]
  recipe: Recipe | None = None

  def __post_init__(self):
    if not self.rules:
      raise ValueError("a Policy needs at least one Rule; with none, nothing would be sparse")
    rules = []
    for i, rule in enumerate(self.rules):
      rule = Rule(*rule) if not isinstance(rule, Rule) else rule
      try:
        re.compile(rule.pattern)
      except re.error as e:
        raise ValueError(
          f"rule {i}: pattern {rule.pattern!r} is not a regular expression: {e}"
        ) from None
      recipe = rule.recipe if rule.recipe is not None else self.recipe
      if recipe is None:
        raise ValueError(f"rule {i} ({rule.pattern!r}) has no recipe and the policy has none")
      nm = parse_nm(rule.nm, name=f"rule {i} ({rule.pattern!r}) nm") if rule.nm else None
      if nm is None and recipe.nm is None and recipe.name != "dense":
        raise ValueError(f"rule {i} ({rule.pattern!r}) sets no N:M and its recipe has none")
      rules.append(rule._replace(nm=nm))
    object.__setattr__(self, "rules", tuple(rules))

  def _rule_recipe(self, rule: Rule) -> Recipe:
    recipe = rule.recipe if rule.recipe is not None else self.recipe
    return recipe.with_nm(rule.nm) if rule.nm is not None else recipe

  def resolve(self, params: Any) -> SparsityPlan:
    """Checks the policy against ``params`` (arrays or shape/dtype structs) and resolves it.

    Raises:
      ValueError: a rule matches no parameter; two rules disagree on one parameter; a selected
        parameter is not floating point; an axis is out of range, cannot be inferred or is not
        divisible by ``m``; an SDGF pattern cannot fit.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = tuple(path_str(p) for p, _ in leaves)
    hits = [[] for _ in self.rules]
    claims: dict[str, list[int]] = {}
    for path in paths:
      for i, rule in enumerate(self.rules):
        if re.search(rule.pattern, path):
          hits[i].append(path)
          claims.setdefault(path, []).append(i)
    for i, rule in enumerate(self.rules):
      if not hits[i]:
        raise ValueError(
          f"rule {i} ({rule.pattern!r}, {rule.nm or self._rule_recipe(rule).nm}) matches no "
          f"parameter; parameters: {_some_paths(paths)}"
        )
    targets = {}
    for (_, leaf), path in zip(leaves, paths):
      if path not in claims:
        continue
      first, *others = claims[path]
      target = self._target(path, leaf, first)
      for other in others:
        alternative = self._target(path, leaf, other)
        if (alternative.recipe, alternative.axes) != (target.recipe, target.axes):
          a, b = self.rules[first], self.rules[other]
          raise ValueError(
            f"{path}: claimed by rule {first} ({a.pattern!r}, {target.recipe}, axis "
            f"{target.axes}) and rule {other} ({b.pattern!r}, {alternative.recipe}, axis "
            f"{alternative.axes}), which disagree"
          )
      targets[path] = target
    return SparsityPlan(targets=targets, paths=paths)

  def _target(self, path: str, leaf: Any, index: int) -> Target:
    rule = self.rules[index]
    shape, dtype = tuple(jnp.shape(leaf)), jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{path}: selected by rule {index} ({rule.pattern!r}) but has dtype {dtype}")
    where = f"{path} with shape {shape}"
    if rule.axis is not None:
      axes = contraction_axes(rule.axis, len(shape), where=where)
    elif len(shape) in (1, 2):
      axes = (0,)
    else:
      raise ValueError(
        f"{where}: cannot infer the contraction axis of a rank-{len(shape)} kernel; give "
        f"axis= in rule {index} ({rule.pattern!r})"
      )
    recipe = self._rule_recipe(rule)
    size = math.prod(shape[a] for a in axes)
    axis_text = axes[0] if len(axes) == 1 else axes
    if recipe.nm is not None and size % recipe.nm.m:
      raise ValueError(
        f"{where}: axis {axis_text} has size {size}, not divisible by m={recipe.nm.m}"
      )
    patterns = recipe.patterns(size, where=f"{where} (axis {axis_text})")
    group = rule.group if rule.group is not None else f"rule_{index}"
    return Target(path, shape, recipe, axes, patterns, index, group)

  def apply(self, params: Any, step: jax.typing.ArrayLike, *, plan: SparsityPlan | None = None):
    """``params`` with every selected kernel replaced by its sparse weight ``W~`` at ``step``.

    Unselected parameters are returned as they are. Differentiable with respect to ``params``
    (each recipe's gradient), and ``step`` may be traced.

    Args:
      params: the parameter tree.
      step: the training step (e.g. ``NMSparsityState.count``).
      plan: a plan from :meth:`resolve` of the same tree, to skip resolving again.
    """
    plan = self.resolve(params) if plan is None else plan

    def leaf_fn(path, leaf):
      target = plan.targets.get(path_str(path))
      if target is None:
        return leaf
      return sparsify_with_patterns(leaf, target.recipe, step, target.axes, target.patterns)

    return jax.tree_util.tree_map_with_path(leaf_fn, params)


# ---- Presets. --------------------------------------------------------------------------------

# Layer groups of known model naming: group -> ((path regex, contraction axis), ...).
LAYER_GROUPS = {
  # T5X's T5 1.1 (t5x/examples/t5/layers.py): every kernel is 2-D, contraction axis 0.
  "t5_1_1": {
    "ff": ((r"mlp/wi(_\d+)?/kernel$", 0), (r"mlp/wo/kernel$", 0)),
    "q": ((r"attention/query/kernel$", 0),),
    "k": ((r"attention/key/kernel$", 0),),
    "v": ((r"attention/value/kernel$", 0),),
    "o": ((r"attention/out/kernel$", 0),),
  },
  # Flax ViTs (google-research/vision_transformer, big_vision, nm_sparse_jax.models.vit):
  # MlpBlock Dense_0 (embed, mlp) and Dense_1 (mlp, embed); attention DenseGeneral kernels
  # query/key/value (embed, heads, head_dim) and out (heads, head_dim, embed).
  "vit": {
    "ff": ((r"MlpBlock_\d+/Dense_[01]/kernel$", 0),),
    "q": ((r"MultiHeadDotProductAttention_\d+/query/kernel$", 0),),
    "k": ((r"MultiHeadDotProductAttention_\d+/key/kernel$", 0),),
    "v": ((r"MultiHeadDotProductAttention_\d+/value/kernel$", 0),),
    "o": ((r"MultiHeadDotProductAttention_\d+/out/kernel$", (0, 1)),),
  },
}
GROUP_ALIASES = {"qk": ("q", "k"), "qkv": ("q", "k", "v"), "attention": ("q", "k", "v", "o")}


def group_members(naming: str, name: str) -> tuple[str, ...]:
  """The layer groups of ``LAYER_GROUPS[naming]`` that ``name`` stands for (aliases expanded).

  Raises:
    ValueError: an unknown naming or group name.

  >>> group_members("vit", "qkv"), group_members("t5_1_1", "ff")
  (('q', 'k', 'v'), ('ff',))
  """
  if naming not in LAYER_GROUPS:
    raise ValueError(f"unknown naming {naming!r}; known: {', '.join(LAYER_GROUPS)}")
  layout = LAYER_GROUPS[naming]
  members = GROUP_ALIASES.get(name, (name,) if name in layout else None)
  if members is None:
    known = ", ".join(list(layout) + list(GROUP_ALIASES))
    raise ValueError(f"unknown layer group {name!r} of {naming!r}; groups: {known}")
  return members


def from_groups(naming: str, recipe: Recipe | None, groups: Mapping[str, Any]) -> Policy:
  """A policy from per-group N:M patterns for a known ``naming`` (a key of LAYER_GROUPS).

  Args:
    naming: "t5_1_1" or "vit".
    recipe: the recipe of every group.
    groups: group -> N:M pattern, or None to leave the group dense. Groups: ``ff``, ``q``,
      ``k``, ``v``, ``o``, and the aliases ``qk``, ``qkv``, ``attention`` (q, k, v and o).

  Raises:
    ValueError: an unknown naming or group, or a group given twice through aliases.
  """
  layout = LAYER_GROUPS.get(naming)
  chosen: dict[str, Any] = {}
  for name, pattern in groups.items():
    members = group_members(naming, name)
    if pattern is None:
      continue
    for member in members:
      if member in chosen:
        raise ValueError(f"layer group {member!r} is given twice (through {name!r})")
      chosen[member] = pattern
  rules = [
    Rule(regex, pattern, None, axis, group)
    for group, pattern in chosen.items()
    for regex, axis in layout[group]
  ]
  if not rules:
    raise ValueError("no layer group has an N:M pattern; nothing would be sparse")
  return Policy(tuple(rules), recipe)


def t5_1_1(recipe: Recipe | None, **groups) -> Policy:
  """A policy for T5X's T5 1.1 naming (mlp wi_0/wi_1/wo; attention query/key/value/out).

  >>> from nm_sparse_jax import recipes
  >>> p = t5_1_1(recipes.sr_ste(), ff="1:32")
  >>> [r.pattern for r in p.rules]
  ['mlp/wi(_\\\\d+)?/kernel$', 'mlp/wo/kernel$']
  """
  return from_groups("t5_1_1", recipe, groups)


def vit(recipe: Recipe | None, **groups) -> Policy:
  """A policy for Flax ViT naming (MlpBlock Dense_0/Dense_1; attention query/key/value/out).

  >>> from nm_sparse_jax import recipes
  >>> p = vit(recipes.ste(), ff="1:8", o="1:4")
  >>> [(str(r.nm), r.axis) for r in p.rules]
  [('1:8', 0), ('1:4', (0, 1))]
  """
  return from_groups("vit", recipe, groups)

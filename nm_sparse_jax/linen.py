"""Running a Flax linen model's forward pass on the sparse weights ``W~``.

Three ways, all with the same numbers and gradients as ``policy.apply(params, step)``:

* functional: ``model.apply({"params": policy.apply(params, step)}, x)``;
* :class:`Sparsified` -- for models you build: wraps a module with ``nn.map_variables``; the
  parameter tree is the wrapped module's own, and the step is read from the ``"nm_sparsity"``
  collection, e.g. ``{"nm_sparsity": {"step": sparsity_step(opt_state)}}``;
* :func:`intercept` -- for models you cannot edit, or whose ``apply`` is called by code you
  cannot edit: a context manager (``nn.intercept_methods``) that runs every module owning a
  selected parameter on its sparse weights.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import flax.linen as nn
import jax

from nm_sparse_jax.policy import Policy, SparsityPlan, path_str

__all__ = ["STEP_COLLECTION", "Sparsified", "intercept"]

STEP_COLLECTION = "nm_sparsity"


class Sparsified(nn.Module):
  """Runs ``module`` on its sparse weights, read from ``nn.map_variables``.

  The parameters are those of ``module`` (same tree, same paths, so existing checkpoints load),
  and ``__call__`` forwards every argument. Apply it with the step in the ``"nm_sparsity"``
  collection; applying without it is an error, never a silent dense run.

  Attributes:
    module: the Flax module to run (unbound).
    policy: the sparsity policy; its paths are those of ``module``'s parameters.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> pol = nmp.Policy([nmp.Rule("layers_0/kernel", "1:4")], recipes.ste())
  >>> model = Sparsified(nn.Sequential([nn.Dense(3)]), pol)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  >>> y = model.apply({"params": params, "nm_sparsity": {"step": 0}}, jnp.ones((1, 8)))
  >>> y.shape
  (1, 3)
  """

  module: nn.Module
  policy: Policy

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    initializing = self.is_initializing()
    policy = self.policy

    def trans_in(variables):
      if initializing:
        return variables
      step = variables.get(STEP_COLLECTION, {}).get("step")
      if step is None:
        raise ValueError(
          f"Sparsified.apply needs the training step: pass "
          f"{{'{STEP_COLLECTION}': {{'step': sparsity_step(opt_state)}}}} with the params"
        )
      return {**variables, "params": policy.apply(variables["params"], step)}

    mapped = nn.map_variables(
      lambda mdl, *a, **k: mdl.module(*a, **k),
      ("params", STEP_COLLECTION),
      trans_in,
      init=initializing,
    )
    return mapped(self, *args, **kwargs)


class _InterceptState(threading.local):
  def __init__(self):
    self.plan: SparsityPlan | None = None
    self.done: set[str] = set()
    self.nested = 0
    self.active = False


_STATE = _InterceptState()


def _owned_targets(plan: SparsityPlan, module: nn.Module) -> list[str]:
  """The selected parameters under ``module``, or none unless it declares one itself.

  Only a module that declares a selected parameter (a ``Dense``, not its ancestors) is re-run on
  sparse weights, so the rest of the model keeps its RNG streams and mutable collections.
  """
  prefix = "/".join(module.path)
  leaves = jax.tree_util.tree_flatten_with_path(module.variables.get("params", {}))[0]
  direct = {"/".join(filter(None, (prefix, path_str(p)))): len(p) == 1 for p, _ in leaves}
  selected = [p for p in direct if p in plan]
  return selected if any(direct[p] for p in selected) else []


@contextlib.contextmanager
def intercept(policy: Policy, step: jax.typing.ArrayLike) -> Iterator[None]:
  """Within this context, ``apply`` of any linen model runs on the sparse weights at ``step``.

  Each module that owns a selected parameter runs as a pure function of its own transformed
  variables (``module.clone(parent=None).apply``). The policy is resolved against the root
  module's parameters at the first call, and the context raises on exit if a selected
  parameter's owner never ran, so nothing is silently left dense. Modules that own selected
  parameters must not update mutable collections (``Dense``, ``DenseGeneral``, ``Conv`` and
  ``Einsum`` do not). During ``init`` nothing is changed.

  Args:
    policy: the sparsity policy, with paths of the root model's parameters.
    step: the training step (may be traced).

  Raises:
    ValueError: anything :meth:`Policy.resolve` rejects, or a selected parameter whose module
      never ran.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> model = nn.Dense(2, use_bias=False)
  >>> params = {"kernel": jnp.array([[1.0, 1.0], [2.0, -3.0]])}
  >>> pol = nmp.Policy([nmp.Rule("kernel", "1:2")], recipes.ste())
  >>> with intercept(pol, step=0):
  ...   y = model.apply({"params": params}, jnp.ones((1, 2)))
  >>> y
  Array([[ 2., -3.]], dtype=float32)
  """
  if _STATE.active:
    raise ValueError("nm_sparse_jax.linen.intercept contexts do not nest")
  _STATE.active = True

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if _STATE.nested or module.scope is None or module.is_initializing():
      return next_fun(*args, **kwargs)
    if _STATE.plan is None:
      _STATE.plan = policy.resolve(module.variables.get("params", {}))
    owned = [] if context.method_name == "setup" else _owned_targets(_STATE.plan, module)
    if not owned:
      return next_fun(*args, **kwargs)
    prefix = "/".join(module.path)
    params = module.variables["params"]
    sub_plan = SparsityPlan(
      targets={p[len(prefix) + 1 :] if prefix else p: _STATE.plan[p] for p in owned},
      paths=(),
    )
    variables = {**module.variables, "params": policy.apply(params, step, plan=sub_plan)}
    _STATE.done.update(owned)
    _STATE.nested += 1
    try:
      rngs = {name: rng.as_jax_rng() for name, rng in module.scope.rngs.items()}
      return module.clone(parent=None).apply(
        variables, *args, method=context.method_name, rngs=rngs, **kwargs
      )
    finally:
      _STATE.nested -= 1

  try:
    with nn.intercept_methods(interceptor):
      yield
    if _STATE.plan is not None:
      missing = [t.path for t in _STATE.plan if t.path not in _STATE.done]
      if missing:
        raise ValueError(
          "intercept: these selected parameters were never used through their module's "
          f"methods, so they were not sparsified: {', '.join(missing)}"
        )
  finally:
    _STATE.plan, _STATE.done, _STATE.nested, _STATE.active = None, set(), 0, False

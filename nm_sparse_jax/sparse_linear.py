"""Running a Flax model's N:M projections on sparse formats at inference.

Three paths give the same numbers (within their dtypes' rounding):

* **dense** -- the masked weights themselves: ``model.apply({"params": finalize(params, policy)})``;
* **bcsr** -- ``export(..., format="bcsr")``: each selected kernel is a
  ``jax.experimental.sparse.BCSR`` ``W^T`` and the layer computes ``(W^T @ x^T)^T`` in float32,
  with ``jax_bcoo_cusparse_lowering`` on so that a GPU runs cuSPARSE (:func:`cusparse_lowering`);
* **nm** -- ``export(..., format="nm")``: the compressed N:M format through the Pallas kernels
  of :mod:`nm_sparse_jax.kernels` (bfloat16 values, float32 accumulation).

:func:`sparse_kernels` is the mechanism: inside it, every ``flax.linen.Dense`` or
``DenseGeneral`` whose ``kernel`` parameter is an :class:`~nm_sparse_jax.export.NMCompressed` or
:class:`~nm_sparse_jax.export.BCSRKernel` computes its product with that format; other modules
run as usual. :func:`apply` and :func:`jit_apply` wrap ``model.apply`` in it.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> from nm_sparse_jax import finalize, policy as nmp, recipes
>>> from nm_sparse_jax.export import export
>>> model = nn.Dense(4)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
>>> pol = nmp.Policy([nmp.Rule("kernel", "1:4")], recipes.ste())
>>> hard = finalize(params, pol)
>>> x = jax.random.normal(jax.random.key(1), (2, 8))
>>> dense = model.apply({"params": hard}, x)
>>> y_nm = apply(model, {"params": export(hard, pol, format="nm")}, x)
>>> y_bcsr = apply(model, {"params": export(hard, pol, format="bcsr")}, x)
>>> bool(jnp.allclose(y_nm, dense, atol=1e-5)), bool(jnp.allclose(y_bcsr, dense, atol=1e-5))
(True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import sparse

from nm_sparse_jax.export import BCSRKernel, NMCompressed
from nm_sparse_jax.kernels import SpmmConfig, nm_matmul

__all__ = ["apply", "bcsr_matmul", "cusparse_lowering", "jit_apply", "linear", "sparse_kernels"]

SparseKernel = NMCompressed | BCSRKernel


def bcsr_matmul(x: jax.typing.ArrayLike, w: BCSRKernel) -> jax.Array:
  """``x @ W`` as ``(W^T @ x^T)^T`` with the BCSR ``W^T``; computed in ``w``'s dtype (float32).

  ``x``'s last axis is contracted; the result has ``x``'s dtype. On a GPU it runs cuSPARSE only
  when lowered inside :func:`cusparse_lowering` (else JAX's gather/scatter-add lowering).
  """
  x = jnp.asarray(x)
  k, o = w.in_features, w.out_features
  if x.shape[-1] != k:
    raise ValueError(f"bcsr_matmul: x has shape {x.shape}; its last axis must be K={k}")
  x2 = x.reshape(-1, k).astype(w.matrix.dtype)
  y_t = sparse.bcsr_dot_general(w.matrix, x2, dimension_numbers=(([1], [1]), ([], [])))
  return y_t.T.reshape(*x.shape[:-1], o).astype(x.dtype)


def linear(
  x: jax.typing.ArrayLike, w: SparseKernel, *, config: SpmmConfig | None = None
) -> jax.Array:
  """``x @ W`` contracting ``x``'s last axis with a sparse kernel seen as ``(K, O)``.

  :class:`~nm_sparse_jax.export.NMCompressed` goes to :func:`~nm_sparse_jax.kernels.nm_matmul`
  (``config`` picks its kernel), :class:`~nm_sparse_jax.export.BCSRKernel` to
  :func:`bcsr_matmul`.
  """
  if isinstance(w, NMCompressed):
    return nm_matmul(x, w, config=config)
  if isinstance(w, BCSRKernel):
    return bcsr_matmul(x, w)
  raise TypeError(f"linear: expected NMCompressed or BCSRKernel, got {type(w).__name__}")


@contextlib.contextmanager
def cusparse_lowering() -> Iterator[None]:
  """``jax_bcoo_cusparse_lowering`` on within the block (restored after).

  The flag is read when a BCSR product is *lowered*, and it is not part of jit's cache key: lower
  and compile inside the block (:func:`jit_apply` does), with a function not compiled before.
  The flag is global: where it is already on, the block leaves it alone (so threads that set it
  once do not race on it).
  """
  if jax.config.jax_bcoo_cusparse_lowering:
    yield
    return
  jax.config.update("jax_bcoo_cusparse_lowering", True)
  try:
    yield
  finally:
    jax.config.update("jax_bcoo_cusparse_lowering", False)


def _contraction(module: nn.Module, x: jax.Array, kernel: SparseKernel) -> int:
  """How many trailing axes of ``x`` the module contracts, checked against ``kernel``."""
  if isinstance(module, nn.Dense):
    count = 1
  else:
    if module.batch_dims:
      raise ValueError(f"{'/'.join(module.path)}: DenseGeneral with batch_dims is not supported")
    axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    axes = tuple(sorted(a % x.ndim for a in axes))
    count = len(axes)
    if axes != tuple(range(x.ndim - count, x.ndim)):
      raise ValueError(
        f"{'/'.join(module.path)}: sparse kernels need the contracted axes of x to be its last "
        f"ones; got axis={module.axis} for x of shape {x.shape}"
      )
  if kernel.axes != tuple(range(count)) or kernel.shape[:count] != x.shape[x.ndim - count :]:
    raise ValueError(
      f"{'/'.join(module.path)}: kernel of shape {kernel.shape} with contraction axes "
      f"{kernel.axes} does not contract x of shape {x.shape} over its last {count} axes"
    )
  return count


def _sparse_call(module: nn.Module, x: jax.Array, kernel: SparseKernel, config) -> jax.Array:
  count = _contraction(module, x, kernel)
  features = kernel.shape[count:]
  out_dtype = module.dtype if module.dtype is not None else x.dtype
  lead = x.shape[: x.ndim - count]
  y = linear(x.reshape(*lead, kernel.in_features), kernel, config=config).astype(out_dtype)
  y = y.reshape(*lead, *features)
  bias = module.variables["params"].get("bias")
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * len(lead) + features).astype(out_dtype)
  return y


@contextlib.contextmanager
def sparse_kernels(*, config: SpmmConfig | None = None) -> Iterator[None]:
  """Within this context, ``Dense``/``DenseGeneral`` modules with a sparse ``kernel`` use it.

  A module whose ``kernel`` parameter is an :class:`~nm_sparse_jax.export.NMCompressed` or a
  :class:`~nm_sparse_jax.export.BCSRKernel` returns ``linear(x, kernel) + bias`` in its
  ``dtype`` (or ``x``'s); its contracted axes must be ``x``'s last ones and the kernel's first
  ones (true for ``Dense`` and for attention's ``DenseGeneral`` projections). Every other module
  runs unchanged.

  Args:
    config: the N:M kernel configuration (default: chosen per token count).
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name != "__call__"
      or not isinstance(module, (nn.Dense, nn.DenseGeneral))
      or module.scope is None
      or module.is_initializing()
    ):
      return next_fun(*args, **kwargs)
    kernel = module.variables.get("params", {}).get("kernel")
    if not isinstance(kernel, (NMCompressed, BCSRKernel)):
      return next_fun(*args, **kwargs)
    return _sparse_call(module, jnp.asarray(args[0]), kernel, config)

  with nn.intercept_methods(interceptor):
    yield


def apply(
  model: nn.Module,
  variables: Any,
  *args,
  config: SpmmConfig | None = None,
  **kwargs,
) -> Any:
  """``model.apply(variables, *args, **kwargs)`` with the sparse kernels in ``variables`` used.

  ``variables["params"]`` is :func:`~nm_sparse_jax.export.export`'s output. For BCSR kernels,
  the cuSPARSE flag is on for the call; under an outer ``jax.jit`` the lowering happens outside
  it, so use :func:`jit_apply` to be sure of cuSPARSE.
  """
  with cusparse_lowering(), sparse_kernels(config=config):
    return model.apply(variables, *args, **kwargs)


def _shape_dtype(a: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))


def jit_apply(
  model: nn.Module, *, config: SpmmConfig | None = None, **static_kwargs
) -> Callable[..., Any]:
  """A compiled ``(variables, *args) -> model.apply(variables, *args, **static_kwargs)``.

  A :func:`jax.jit` of ``model.apply`` traced inside :func:`sparse_kernels`, called inside
  :func:`cusparse_lowering` (so BCSR kernels run cuSPARSE on a GPU: the flag is on whenever this
  private jit lowers a new signature). Repeated calls take jit's C++ dispatch path: on a ViT-L
  (393 parameter leaves) that is ~0.13 ms of host time per call, where looking up an executable
  by the shapes of every leaf in Python and calling it took ~0.9 ms. The callable's
  ``signatures`` list holds the ``args`` shapes and dtypes of each trace (one per compiled
  signature), and its ``lower`` gives the lowering for given arguments
  (``f.lower(v, x).compile().as_text()``), for inspection.
  The flag is global: where several threads call such functions, set it once
  (``jax.config.update("jax_bcoo_cusparse_lowering", True)``) and the calls leave it alone.

  >>> import flax.linen as nn, jax.numpy as jnp
  >>> f = jit_apply(nn.Dense(2))
  >>> f({"params": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}}, jnp.ones((1, 2)))
  Array([[1., 1.]], dtype=float32)
  >>> [(a.shape, str(a.dtype)) for (a,) in f.signatures]
  [((1, 2), 'float32')]
  """
  signatures: list[Any] = []

  def fn(variables, *args):
    # A Python side effect: runs once per trace, i.e. per compiled signature.
    signatures.append(jax.tree_util.tree_map(_shape_dtype, args))
    with sparse_kernels(config=config):
      return model.apply(variables, *args, **static_kwargs)

  jitted = jax.jit(fn)

  def call(variables, *args):
    with cusparse_lowering():
      return jitted(variables, *args)

  def lower(variables, *args) -> jax.stages.Lowered:
    """The lowering that ``call`` runs for these arguments (e.g. to check its HLO)."""
    with cusparse_lowering():
      return jitted.lower(variables, *args)

  call.signatures = signatures
  call.lower = lower
  return call

"""The model hook: a T5X model that runs on the sparse weights ``W~`` of the selected kernels.

:func:`sparsify_model` takes a model that gin already built (``base.gin``'s
``models.EncoderDecoderModel()``, with every binding it has) and returns the same model whose
public entry points see ``policy.apply(params, j)`` instead of ``params``:

* ``loss_fn`` (training) and ``eval_fn`` (training-time eval) with the step ``j`` that
  :func:`~nm_sparse_jax.t5x.sparse_trainer` hands them (the step relative to the start of
  training); ``loss_fn`` adds the metrics of :func:`sparsity_metrics`;
* ``predict_batch_with_aux`` and ``score_batch`` (decoding, scoring), and ``eval_fn`` called
  without a step (``python -m t5x.eval``), with ``inference_step``: by default the final weights
  ``W * Phi`` (:func:`nm_sparse_jax.finalize`), i.e. what the trained model computes with.

Only parameter values change, so the parameter tree, its ``params_axes``, the optimizer and the
checkpoints are those of the wrapped model: public dense T5X checkpoints restore as they are.
Gradients reach ``W`` through each recipe's rule (:func:`nm_sparse_jax.sparsify`).

The new model's class derives from ``type(model)``, not from ``models.EncoderDecoderModel``: a
gin method binding such as ``models.EncoderDecoderModel.predict_batch_with_aux.num_decodes``
makes gin build a generated subclass, whose bindings a subclass of the original class would miss.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from nm_sparse_jax import finalize
from nm_sparse_jax.policy import Policy, SparsityPlan, path_str

__all__ = ["NMSparseModel", "sparsify_model", "sparsity_metrics"]

METRIC_PREFIX = "nm_sparsity"
# A step after the end of every schedule (int32 max): the fine-tune phase of every recipe.
FINAL_STEP = 2**31 - 1


class _Passthrough(threading.local):
  """Set while a hooked method runs, so that nested hooked calls do not transform twice."""

  active = False


_PASSTHROUGH = _Passthrough()


@contextlib.contextmanager
def _transformed():
  """Marks the parameters as already transformed (trace-time Python state, not traced)."""
  previous, _PASSTHROUGH.active = _PASSTHROUGH.active, True
  try:
    yield
  finally:
    _PASSTHROUGH.active = previous


def sparsity_metrics(
  plan: SparsityPlan, sparse_params, step: jax.typing.ArrayLike
) -> dict[str, jax.Array]:
  """Scalars describing the sparse weights at ``step``, per layer group and overall.

  For each layer group ``g`` (the rules' ``group``: ``ff``, ``q``, ``k``, ``v``, ``o`` for the
  presets, else ``rule_<index>``; the schedule of its first kernel):

  * ``g/sparsity``: realised sparsity, the fraction of exact zeros of ``W~`` in the group;
  * ``g/pattern``: the mask in use, ``0`` = dense, ``i + 1`` = pattern ``i`` of
    ``recipe.patterns`` (the target is the last);
  * ``g/density``: ``n / m`` of that pattern (1 when dense);
  * ``g/decay``: ``D(j)``;
  * ``g/phase``: 0 dense, 1 sparsification, 2 fine-tune.

  and ``sparsity`` (all selected kernels) and ``step`` (``j``).

  Args:
    plan: the resolved policy.
    sparse_params: the parameters after ``policy.apply`` (or ``finalize``).
    step: the step ``j`` the weights are for.

  Returns:
    A flat dict of float32 scalars, keyed without the ``nm_sparsity/`` prefix.
  """
  step = jnp.asarray(step, jnp.int32)
  leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(sparse_params)[0]}
  zeros: dict[str, jax.Array] = {}
  sizes: dict[str, int] = {}
  first = {}
  for target in plan:
    group = target.group
    w = jax.lax.stop_gradient(leaves[target.path])
    zeros[group] = zeros.get(group, 0) + jnp.sum(w == 0).astype(jnp.float32)
    sizes[group] = sizes.get(group, 0) + w.size
    first.setdefault(group, target)
  out = {}
  for group, target in first.items():
    recipe, patterns = target.recipe, target.patterns
    branch = recipe.mask_branch(step, len(patterns)) if patterns else jnp.zeros((), jnp.int32)
    densities = jnp.asarray([1.0] + [p.density for p in patterns], jnp.float32)
    out[f"{group}/sparsity"] = zeros[group] / sizes[group]
    out[f"{group}/pattern"] = branch.astype(jnp.float32)
    out[f"{group}/density"] = densities[branch]
    out[f"{group}/decay"] = recipe.decay(step) if patterns else jnp.ones((), jnp.float32)
    out[f"{group}/phase"] = recipe.phase(step).astype(jnp.float32)
  out["sparsity"] = sum(zeros.values()) / max(sum(sizes.values()), 1)
  out["step"] = step.astype(jnp.float32)
  return out


def _as_clu(values: Mapping[str, jax.Array]) -> dict[str, clu_metrics.Metric]:
  """Metrics for T5X's summaries: the value of the last step of each reporting period."""
  return {f"{METRIC_PREFIX}/{k}": clu_metrics.LastValue(value=v) for k, v in values.items()}


class NMSparseModel:
  """Mixin of :func:`sparsify_model`; put before a T5X model class (``BaseModel`` API).

  Attributes (set by :func:`sparsify_model`):
    nm_policy: the :class:`~nm_sparse_jax.policy.Policy`.
    nm_inference_step: the step of the weights for decoding, scoring and step-less
      ``eval_fn``; None for the final weights ``W * Phi``.
  """

  nm_policy: Policy
  nm_inference_step: int | None = None

  def nm_params(self, params, step: jax.typing.ArrayLike | None = None):
    """``params`` with the selected kernels replaced by ``W~`` at ``step`` (None: final ``W*Phi``).

    Returns:
      ``(sparse_params, plan, step)``, ``step`` being the step used (None for the final weights).
    """
    plan = self.nm_policy.resolve(params)
    step = self.nm_inference_step if step is None else step
    if step is None:
      return finalize(params, self.nm_policy), plan, None
    return self.nm_policy.apply(params, step, plan=plan), plan, step

  def _nm_metrics(self, plan, sparse_params, step):
    # The final weights are those of any step past every schedule's end.
    step = FINAL_STEP if step is None else step
    return _as_clu(sparsity_metrics(plan, sparse_params, step))

  def loss_fn(self, params, batch, dropout_rng, *args, nm_step=None, **kwargs):
    """The wrapped ``loss_fn`` on ``W~`` at ``nm_step``, with the sparsity metrics added.

    Raises:
      TypeError: no ``nm_step``: T5X's stock trainer, which never passes the step, is training
        the model (the recipe's schedule and gradients would be silently wrong).
    """
    if _PASSTHROUGH.active:
      return super().loss_fn(params, batch, dropout_rng, *args, **kwargs)
    if nm_step is None:
      raise TypeError(
        f"{type(self).__name__}.loss_fn needs nm_step, the training step: train with "
        "train_script.train.trainer_cls = @nm_t5x.sparse_trainer() (gin/nm/trainer.gin)"
      )
    sparse, plan, step = self.nm_params(params, nm_step)
    with _transformed():
      loss, aux = super().loss_fn(sparse, batch, dropout_rng, *args, **kwargs)
    return loss, _add_metrics(aux, self._nm_metrics(plan, sparse, step))

  def eval_fn(self, params, batch, *args, nm_step=None, **kwargs):
    """The wrapped ``eval_fn`` on ``W~`` at ``nm_step``, with the sparsity metrics added."""
    if _PASSTHROUGH.active:
      return super().eval_fn(params, batch, *args, **kwargs)
    sparse, plan, step = self.nm_params(params, nm_step)
    with _transformed():
      loss, aux = super().eval_fn(sparse, batch, *args, **kwargs)
    return loss, _add_metrics(aux, self._nm_metrics(plan, sparse, step))

  def predict_batch_with_aux(self, params, batch, *args, **kwargs):
    """The wrapped ``predict_batch_with_aux`` on the inference weights."""
    if _PASSTHROUGH.active:
      return super().predict_batch_with_aux(params, batch, *args, **kwargs)
    sparse, _, _ = self.nm_params(params)
    with _transformed():
      return super().predict_batch_with_aux(sparse, batch, *args, **kwargs)

  def score_batch(self, params, batch, *args, **kwargs):
    """The wrapped ``score_batch`` on the inference weights."""
    if _PASSTHROUGH.active:
      return super().score_batch(params, batch, *args, **kwargs)
    sparse, _, _ = self.nm_params(params)
    with _transformed():
      return super().score_batch(sparse, batch, *args, **kwargs)


def _add_metrics(aux, extra):
  """Adds ``extra`` to the metrics of ``loss_fn``'s aux: ``metrics`` or ``(metrics, mutables)``."""
  if isinstance(aux, tuple):
    metrics, *rest = aux
    return ({**metrics, **extra}, *rest)
  return {**aux, **extra}


def sparsify_model(model, policy: Policy, *, inference_step: int | None = None):
  """``model`` (a configured T5X model) running on the sparse weights of ``policy``.

  In gin, after ``base.gin`` (which configures ``MODEL = @models.EncoderDecoderModel()``)::

    MODEL = @nm_t5x.sparsify_model()
    nm_t5x.sparsify_model.model = @models.EncoderDecoderModel()
    nm_t5x.sparsify_model.policy = %NM_POLICY

  Args:
    model: a T5X model instance (``EncoderDecoderModel``, ``DecoderOnlyModel``, or any model
      with the ``BaseModel`` API whose entry points take ``params`` first).
    policy: which kernels are sparse, at which N:M, with which recipe.
    inference_step: the step (relative to the start of training) of the weights used to decode,
      score and evaluate without a trainer; None (default) for the final weights ``W * Phi``.

  Returns:
    A copy of ``model`` whose class is ``NMSparse<Class>(NMSparseModel, type(model))``.

  Raises:
    TypeError: ``model`` is already sparsified, or lacks the T5X model API.
  """
  if isinstance(model, NMSparseModel):
    raise TypeError(f"{type(model).__name__} is already sparsified")
  if not all(hasattr(model, name) for name in ("loss_fn", "eval_fn", "predict_batch_with_aux")):
    raise TypeError(f"{type(model).__name__} is not a T5X model (no loss_fn/eval_fn/predict)")
  base = type(model)
  cls = type(f"NMSparse{base.__name__}", (NMSparseModel, base), {"__module__": __name__})
  sparse = object.__new__(cls)
  sparse.__dict__.update(model.__dict__)
  sparse.nm_policy = policy
  sparse.nm_inference_step = inference_step
  return sparse

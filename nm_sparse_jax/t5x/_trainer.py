"""The step: a T5X ``Trainer`` that hands the model the training step, relative to the start.

T5X's stock trainer gives ``train_state.step`` only to the learning-rate schedule and the dropout
RNG; ``loss_fn`` never sees it. :func:`sparse_trainer` derives a trainer class from the one gin
configured (``@trainer.Trainer``, with its ``num_microbatches`` and ``learning_rate_fn``) whose
partitioned train and eval steps call the stock ``trainer.train_with_lr`` and
``trainer.eval_step`` with the model's ``loss_fn``/``eval_fn`` bound to

    j = train_state.step - start_step

so the step is the exact optimizer step (microbatches do not advance it) and the recipe's
schedule starts where training starts: fine-tuning T5 1.1 from its ``checkpoint_1000000`` for
100k steps uses a recipe of ``total_steps=100_000``.

**The start step.** Unless ``start_step`` is bound, it is the step of the train state the first
run in ``MODEL_DIR`` starts from (0 from scratch, 1,000,000 for a public T5 1.1 checkpoint), and
it is recorded in ``MODEL_DIR/nm_sparsity.json`` before the first step. A restarted or resumed
run (T5X restores the latest checkpoint of ``MODEL_DIR``) reads it back, so the schedule goes on
where it stopped. The file sits beside the checkpoints: copy it with them. Binding
``start_step`` (an int) overrides the file, which is then rewritten.

**Metrics.** Besides the model's ``nm_sparsity/...`` metrics, the train step reports the cheap
gradient-flow diagnostics of :func:`gradient_flow_metrics` per layer group.

**Sharding.** At construction the trainer checks that no N:M group straddles a shard boundary:
for every selected kernel whose contraction axis is partitioned over ``s`` devices, each shard's
slice of that axis must be a multiple of the largest ``m`` of the kernel's patterns. Straddling
groups are computed correctly by XLA but need cross-device traffic in every step;
``shard_check="error"`` (default) raises, ``"warn"`` logs, ``"off"`` skips the check.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from t5x import trainer as trainer_lib
from t5x import utils as t5x_utils

from nm_sparse_jax.diagnostics import adam_nu, pooled_variance
from nm_sparse_jax.policy import SparsityPlan, path_str
from nm_sparse_jax.t5x._model import NMSparseModel, _as_clu

__all__ = [
  "NMSparseTrainer",
  "START_STEP_FILE",
  "gradient_flow_metrics",
  "shard_problems",
  "sparse_trainer",
]

START_STEP_FILE = "nm_sparsity.json"
SHARD_CHECKS = ("error", "warn", "off")


class _StepBoundModel:
  """``model`` whose ``loss_fn``/``eval_fn`` get ``nm_step=step``; everything else is forwarded."""

  def __init__(self, model: NMSparseModel, step: jax.Array):
    self._model = model
    self._step = step

  def __getattr__(self, name):
    return getattr(self._model, name)

  def loss_fn(self, *args, **kwargs):
    return self._model.loss_fn(*args, nm_step=self._step, **kwargs)

  def eval_fn(self, *args, **kwargs):
    return self._model.eval_fn(*args, nm_step=self._step, **kwargs)


def _gfile():
  import tensorflow as tf  # T5X's own file layer (local paths, gs://)

  return tf.io.gfile


def resolve_start_step(model_dir: str | None, current_step: int, bound: int | None) -> int:
  """The start step: ``bound``, else the recorded one, else ``current_step`` (then recorded).

  The record is ``model_dir/nm_sparsity.json``; process 0 writes it.
  """
  path = os.path.join(model_dir, START_STEP_FILE) if model_dir else None
  recorded = None
  if path and _gfile().exists(path):
    with _gfile().GFile(path) as f:
      recorded = int(json.load(f)["start_step"])
  if bound is not None:
    start = int(bound)
    if recorded is not None and recorded != start:
      logging.warning("nm_sparsity: start_step=%d is bound; %s recorded %d", start, path, recorded)
  else:
    start = current_step if recorded is None else recorded
  if path and recorded != start and jax.process_index() == 0:
    _gfile().makedirs(model_dir)
    with _gfile().GFile(path, "w") as f:
      json.dump({"start_step": start}, f)
  if start > current_step:
    raise ValueError(
      f"nm_sparsity: start step {start} is after the restored step {current_step}"
      + (f" (from {path})" if recorded is not None and bound is None else "")
    )
  return start


def _mesh_axis_size(mesh_shape, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh_shape[n] for n in names)


def shard_problems(plan: SparsityPlan, param_specs, mesh_shape) -> list[str]:
  """Descriptions of the selected kernels whose N:M groups straddle a shard boundary.

  Args:
    plan: the resolved policy.
    param_specs: the params' mesh ``PartitionSpec`` tree (``train_state_axes.params``).
    mesh_shape: mesh axis name -> size.

  >>> from nm_sparse_jax import policy as nmp, recipes
  >>> import numpy as np
  >>> plan = nmp.Policy([nmp.Rule("wo", "1:8")], recipes.ste()).resolve({"wo": np.ones((32, 4))})
  >>> shard_problems(plan, {"wo": PartitionSpec("model", None)}, {"model": 8})
  ['wo: axis 0 of size 32 is split over 8 devices (mesh axes model), 4 rows each, not a multiple \
of m=8']
  """
  specs = {
    path_str(p): s
    for p, s in jax.tree_util.tree_flatten_with_path(
      param_specs, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec)
    )[0]
  }
  problems = []
  for target in plan:
    spec = specs.get(target.path)
    if spec is None or not target.patterns:
      continue
    m = max(p.m for p in target.patterns)
    for i, axis in enumerate(target.axes):
      entry = spec[axis] if axis < len(spec) else None
      shards = _mesh_axis_size(mesh_shape, entry)
      if shards == 1:
        continue
      inner = math.prod(target.shape[a] for a in target.axes[i + 1 :])
      block = target.shape[axis] // shards * inner
      if block % m:
        names = entry if isinstance(entry, str) else ",".join(entry)
        problems.append(
          f"{target.path}: axis {axis} of size {target.shape[axis]} is split over {shards} "
          f"devices (mesh axes {names}), {block} rows each, not a multiple of m={m}"
        )
  return problems


def gradient_flow_metrics(plan: SparsityPlan, grads, optimizer_state) -> dict[str, jax.Array]:
  """The cheap gradient-flow diagnostics of the paper's Fig. 3, per layer group.

  ``<group>/grad_abs_var``: ``Var(|g|)`` over the group's selected kernels (the accumulated
  gradient of the step); ``<group>/nu_var``: ``Var(nu)`` of Adam's second-moment estimate after
  the update, where the optimizer is an optax Adam variant (none for T5X's Adafactor, whose
  second moments are factored). Mask flip rates need the previous step's masks and are left to
  :func:`nm_sparse_jax.diagnostics.nm_diagnostics` in loops that can carry its state.
  """
  by_path = {path_str(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  nu = adam_nu(optimizer_state)
  nu_by_path = (
    {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(nu)[0]} if nu else {}
  )
  groups: dict[str, list[str]] = {}
  for target in plan:
    groups.setdefault(target.group, []).append(target.path)
  out = {}
  for group, paths in groups.items():
    out[f"{group}/grad_abs_var"] = pooled_variance([jnp.abs(by_path[p]) for p in paths])
    if all(p in nu_by_path for p in paths):
      out[f"{group}/nu_var"] = pooled_variance([nu_by_path[p] for p in paths])
  return out


class NMSparseTrainer:
  """Mixin of :func:`sparse_trainer`; put before a ``t5x.trainer.Trainer`` class."""

  nm_start_step_binding: int | None = None
  nm_shard_check: str = "error"

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if not isinstance(self._model, NMSparseModel):
      raise TypeError(
        f"the trainer is nm_sparse_jax.t5x.sparse_trainer(), but the model "
        f"({type(self._model).__name__}) is not sparsified: bind "
        "MODEL = @nm_t5x.sparsify_model() (gin/nm/model.gin)"
      )
    current = int(t5x_utils.get_local_data(self.train_state.step))  # multi-host safe
    self.nm_start_step = resolve_start_step(
      kwargs.get("summary_dir"), current, self.nm_start_step_binding
    )
    logging.info(
      "nm_sparsity: schedule step j = train_state.step - %d (j = %d now)",
      self.nm_start_step,
      current - self.nm_start_step,
    )
    self._nm_check_shards()

  def _nm_check_shards(self) -> None:
    if self.nm_shard_check == "off":
      return
    plan = self._model.nm_policy.resolve(self.train_state.params)
    mesh_shape = dict(self._partitioner.mesh.shape)
    problems = shard_problems(plan, self._train_state_axes.params, mesh_shape)
    if not problems:
      return
    message = (
      "N:M groups straddle shard boundaries (correct, but every step moves data between "
      "devices):\n  " + "\n  ".join(problems) + "\nUse fewer model partitions for these axes "
      "(partitioning.PjitPartitioner.num_partitions / model_parallel_submesh), or bind "
      "nm_t5x.sparse_trainer.shard_check = 'warn'."
    )
    if self.nm_shard_check == "error":
      raise ValueError(message)
    logging.warning("%s", message)

  def _nm_model(self, train_state) -> _StepBoundModel:
    step = jnp.maximum(train_state.step - self.nm_start_step, 0).astype(jnp.int32)
    return _StepBoundModel(self._model, step)

  @functools.cached_property
  def _partitioned_train_step(self):
    def train_step(train_state, batch):
      # trainer_lib.train_with_lr, with the gradient-flow metrics taken between its two halves.
      grad_accum, metrics, flax_mutables = trainer_lib.accumulate_grads_microbatched(
        self._nm_model(train_state),
        train_state,
        batch,
        self._get_step_rng(train_state.step),
        self._num_microbatches,
        self._partitioner.data_partition_spec,
      )
      new_train_state, metrics = trainer_lib.apply_grads(
        train_state,
        grad_accum,
        metrics,
        self._learning_rate_fn(train_state.step),
        self._weight_metrics_computer,
        other_state_variables={"flax_mutables": flax_mutables} if flax_mutables else None,
      )
      plan = self._model.nm_policy.resolve(train_state.params)
      extra = gradient_flow_metrics(plan, grad_accum, new_train_state.param_states)
      return new_train_state, {**metrics, **_as_clu(extra)}

    return self._partitioner.partition(
      train_step,
      in_axis_resources=(self._train_state_axes, self._partitioner.data_partition_spec),
      out_axis_resources=(self._train_state_axes, None),
      donate_argnums=(0,),
    )

  @functools.cached_property
  def _partitioned_eval_step(self):
    def eval_step(train_state, batch):
      return trainer_lib.eval_step(self._nm_model(train_state), train_state, batch)

    return self._partitioner.partition(
      eval_step,
      in_axis_resources=(self._train_state_axes, self._partitioner.data_partition_spec),
      out_axis_resources=None,
    )


def sparse_trainer(
  trainer_cls=trainer_lib.Trainer, *, start_step: int | None = None, shard_check: str = "error"
):
  """A trainer class for ``train_script.train.trainer_cls`` that hands the model its step.

  In gin (train runs only: this binds ``train_script.train``, which ``t5x.eval`` lacks)::

    train_script.train.trainer_cls = @nm_t5x.sparse_trainer()
    nm_t5x.sparse_trainer.trainer_cls = @trainer.Trainer

  Passing the gin reference ``@trainer.Trainer`` keeps its bindings (``num_microbatches``,
  ``learning_rate_fn``) in force for the derived class.

  Args:
    trainer_cls: the ``t5x.trainer.Trainer`` (sub)class to derive from.
    start_step: the ``train_state.step`` at which the recipe's step ``j`` is 0; None to record
      the step of the first run in ``MODEL_DIR`` (see the module docstring).
    shard_check: "error", "warn" or "off", for N:M groups that straddle shard boundaries.

  Returns:
    The class ``NMSparse<Trainer>(NMSparseTrainer, trainer_cls)``.

  Raises:
    ValueError: an unknown ``shard_check``, or a negative ``start_step``.
  """
  if shard_check not in SHARD_CHECKS:
    raise ValueError(f"shard_check={shard_check!r} must be one of {SHARD_CHECKS}")
  if start_step is not None and int(start_step) < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  return type(
    f"NMSparse{trainer_cls.__name__}",
    (NMSparseTrainer, trainer_cls),
    {
      "__module__": __name__,
      "nm_start_step_binding": start_step,
      "nm_shard_check": shard_check,
    },
  )

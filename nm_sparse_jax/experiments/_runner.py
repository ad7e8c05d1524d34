"""Training one model per (recipe, N:M target, seed), with diagnostics, FLOPs and evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nm_sparse_jax import policy as policy_lib
from nm_sparse_jax import recipes
from nm_sparse_jax.diagnostics import layer_groups, nm_diagnostics
from nm_sparse_jax.finalize import finalize, verify
from nm_sparse_jax.flops import inference_flops
from nm_sparse_jax.linen import Sparsified
from nm_sparse_jax.training_flops import training_flops
from nm_sparse_jax.transform import nm_sparsity, sparsity_step

from ._tasks import Task

__all__ = ["Settings", "compare", "parse_target", "run_key", "target_label", "train_one"]

# Diagnostics groups recorded in every run (and plotted).
DIAGNOSTIC_GROUPS = ("ff", "qkv")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Training settings shared by every run of a comparison.

  Attributes:
    steps: training steps ``T``.
    batch: examples per step.
    learning_rate: AdamW peak learning rate (linear warmup, then cosine decay to 0).
    weight_decay: AdamW weight decay.
    warmup_fraction: warmup steps / ``T``.
    dense_fraction: dense phase ``d / T`` of every sparse recipe.
    fine_tune_fraction: fine-tune phase ``s / T``.
    lambda_w: SR-STE's regulariser weight.
    gradient: MDGF/SDGF gradient, "autodiff" (pruned weights get ``D(j) * g``, so none under
      SDGF) or "straight_through" (every weight gets ``g``, as the authors' PyTorch code).
    log_every: record the diagnostics every this many steps.
    eval_every: evaluate (with ``W~`` at that step) every this many steps.
    eval_examples: test examples of the intermediate evaluations (all for the final one).
    eval_batch: examples per evaluation batch.
  """

  steps: int = 1000
  batch: int = 64
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  warmup_fraction: float = 0.05
  dense_fraction: float = 0.1
  fine_tune_fraction: float = 0.2
  lambda_w: float = 2e-4
  gradient: str = "autodiff"
  log_every: int = 10
  eval_every: int = 250
  eval_examples: int = 2000
  eval_batch: int = 500

  def __post_init__(self):
    for name in ("steps", "batch", "log_every", "eval_every", "eval_examples", "eval_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    for name in ("dense_fraction", "fine_tune_fraction", "warmup_fraction"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
    if self.gradient not in recipes.GRADIENTS:
      raise ValueError(f"gradient={self.gradient!r} must be one of {recipes.GRADIENTS}")
    if self.dense_fraction + self.fine_tune_fraction >= 1.0:
      raise ValueError(
        f"dense_fraction + fine_tune_fraction = {self.dense_fraction + self.fine_tune_fraction}"
        " leaves no sparsification phase; it must be < 1"
      )

  @property
  def dense_steps(self) -> int:
    return round(self.dense_fraction * self.steps)

  @property
  def fine_tune_steps(self) -> int:
    return round(self.fine_tune_fraction * self.steps)

  def matches(self, saved: Mapping[str, Any]) -> bool:
    """Whether a run's saved settings are these (a setting it lacks counts as its default)."""
    current = dataclasses.asdict(self)
    defaults = dataclasses.asdict(Settings())
    return {k: saved.get(k, defaults[k]) for k in current} == current


def parse_target(spec: str | Mapping[str, str]) -> dict[str, str]:
  """A target from ``"ff=1:8,qkv=1:8"`` (the command line's form) or a mapping, checked.

  Raises:
    ValueError: a malformed entry, an N:M that ``parse_nm`` rejects, or no group.

  >>> parse_target("ff=1:8,qkv=1:4")
  {'ff': '1:8', 'qkv': '1:4'}
  """
  from nm_sparse_jax._masks import parse_nm

  if isinstance(spec, str):
    items = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      group, sep, nm = part.partition("=")
      if not sep:
        raise ValueError(f"target {spec!r}: {part!r} is not GROUP=N:M (e.g. 'ff=1:8')")
      items[group.strip()] = nm.strip()
  else:
    items = dict(spec)
  if not items:
    raise ValueError(f"target {spec!r} names no layer group")
  return {group: str(parse_nm(nm, name=f"target {group}")) for group, nm in items.items()}


def target_label(target: Mapping[str, str]) -> str:
  """The paper's row label: ``{"ff": "1:8", "qkv": "1:8"}`` -> ``"1:8 (FF) + 1:8 (QKV)"``.

  >>> target_label({"ff": "1:8", "qkv": "1:8"})
  '1:8 (FF) + 1:8 (QKV)'
  """
  return " + ".join(f"{nm} ({group.upper()})" for group, nm in target.items())


def run_key(task: str, recipe: str, target: Mapping[str, str], seed: int) -> str:
  """The identity of one run among runs of the same settings."""
  return f"{task}|{recipe}|{target_label(target)}|{seed}"


def _batches(arrays, size):
  for start in range(0, len(arrays[0]), size):
    yield tuple(jnp.asarray(a[start : start + size]) for a in arrays)


def _evaluate(eval_fn, arrays, size) -> float:
  correct = count = 0
  for batch in _batches(arrays, size):
    c, n = eval_fn(batch)
    correct, count = correct + int(c), count + int(n)
  return correct / max(count, 1)


def _kernel_sparsity(report) -> float:
  if report is None or not report.layers:
    return 0.0
  total = sum(float(np.prod(layer.shape)) for layer in report.layers)
  return sum(layer.sparsity * float(np.prod(layer.shape)) for layer in report.layers) / total


def train_one(
  task: Task,
  recipe_name: str,
  target: Mapping[str, str],
  seed: int,
  settings: Settings,
  *,
  on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
  """Trains ``task.model`` with one recipe, N:M target and seed; returns the run's record.

  The model is initialised from ``seed``, and the training examples are drawn in an order from
  ``seed``, so runs with the same seed differ only in their recipe. The dense recipe runs
  through the same code (its policy changes nothing). The final accuracy is that of the
  finalized (hard N:M) parameters on the whole test set.

  Args:
    task: the model and data.
    recipe_name: a name of ``recipes.RECIPE_NAMES``.
    target: layer group -> N:M (``{"ff": "1:8"}``); groups of ``policy.from_groups``.
    seed: the run's seed.
    settings: the shared training settings.
    on_step: called as ``on_step(step, loss)`` now and then (every ``log_every`` steps).

  Returns:
    A JSON-ready dict: settings, final accuracy and loss, evaluation curve (step, training
    FLOPs so far, accuracy), diagnostics curves, training FLOPs per phase, inference FLOPs,
    the N:M verification and wall time.
  """
  total = settings.steps
  kwargs = dict(
    total_steps=total, dense_steps=settings.dense_steps, fine_tune_steps=settings.fine_tune_steps
  )
  if recipe_name == "sr_ste":
    kwargs["lambda_w"] = settings.lambda_w
  if recipe_name.startswith(("mdgf_", "sdgf_")):
    kwargs["gradient"] = settings.gradient
  recipe = recipes.get(recipe_name, **kwargs)
  policy = policy_lib.from_groups(task.naming, recipe, target)
  sparse = recipe_name != "dense"
  model = Sparsified(task.model, policy)
  example = tuple(jnp.asarray(a[:1]) for a in task.train)
  params = task.model.init(jax.random.key(seed), *task.inputs(example))["params"]
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    settings.learning_rate,
    warmup_steps=max(round(settings.warmup_fraction * total), 1),
    decay_steps=total,
  )
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, weight_decay=settings.weight_decay),
    nm_sparsity(policy),
  )
  opt_state = tx.init(params)
  groups = layer_groups(task.naming, DIAGNOSTIC_GROUPS)
  diagnostics = nm_diagnostics(policy, groups=groups)
  diag_state = diagnostics.init(params)

  def loss_fn(p, step, batch):
    variables = {"params": p, "nm_sparsity": {"step": step}}
    return task.loss(model.apply(variables, *task.inputs(batch)), batch)

  @jax.jit
  def train_step(p, state, dstate, batch):
    step = sparsity_step(state)
    loss, grads = jax.value_and_grad(loss_fn)(p, step, batch)
    updates, new_state = tx.update(grads, state, p)
    metrics, dstate = diagnostics.update(dstate, p, grads, step, new_state)
    return optax.apply_updates(p, updates), new_state, dstate, loss, metrics

  @jax.jit
  def eval_sparse(p, step, batch):
    variables = {"params": p, "nm_sparsity": {"step": step}}
    return task.correct(model.apply(variables, *task.inputs(batch)), batch)

  @jax.jit
  def eval_final(p, batch):
    return task.correct(task.model.apply({"params": p}, *task.inputs(batch)), batch)

  flops = training_flops(
    params,
    policy,
    steps=total,
    tokens=task.tokens,
    phases=recipe,
    extra_dense_flops=task.extra_dense_flops,
  )
  cumulative = flops.cumulative(settings.batch)
  eval_arrays = tuple(a[: settings.eval_examples] for a in task.test)

  rng = np.random.default_rng(seed)
  order = np.array([], np.int64)
  n_train = len(task.train[0])
  curves: dict[str, list] = {"step": [], "loss": []}
  evals = []
  start = time.perf_counter()
  loss = jnp.nan
  for step in range(total):
    if len(order) < settings.batch:
      order = np.concatenate([order, rng.permutation(n_train)])
    idx, order = order[: settings.batch], order[settings.batch :]
    batch = tuple(jnp.asarray(a[idx]) for a in task.train)
    params, opt_state, diag_state, loss, metrics = train_step(params, opt_state, diag_state, batch)
    if step % settings.log_every == 0 or step == total - 1:
      metrics = jax.device_get(metrics)
      curves["step"].append(step)
      curves["loss"].append(float(loss))
      for key, value in metrics.items():
        curves.setdefault(key, []).append(float(value))
      if on_step is not None:
        on_step(step, float(loss))
    if (step + 1) % settings.eval_every == 0 and step + 1 < total:
      step_now = sparsity_step(opt_state)
      accuracy = _evaluate(
        lambda b, p=params, s=step_now: eval_sparse(p, s, b), eval_arrays, settings.eval_batch
      )
      evals.append([step + 1, float(cumulative[step]), accuracy])
  seconds = time.perf_counter() - start

  final = finalize(params, policy)
  accuracy = _evaluate(lambda b: eval_final(final, b), task.test, settings.eval_batch)
  evals.append([total, float(cumulative[-1]), accuracy])
  report = verify(final, policy) if sparse else None
  inference = inference_flops(
    final,
    policy if sparse else None,
    tokens=task.tokens,
    extra_dense_flops=task.extra_dense_flops,
  )
  return {
    "task": task.name,
    "recipe": recipe_name,
    "target": dict(target),
    "label": target_label(target),
    "seed": int(seed),
    "settings": dataclasses.asdict(settings),
    "final_accuracy": accuracy,
    "final_loss": float(loss),
    "eval": evals,
    "curves": curves,
    "patterns": {t.path: [str(p) for p in t.patterns] for t in policy.resolve(params)},
    "training_flops": {**flops.by_phase(settings.batch), "total": flops.total(settings.batch)},
    "dense_training_flops": flops.dense_step * settings.batch * total,
    "inference_flops": {"dense": inference.dense, "sparse": inference.sparse},
    "verified": None if report is None else all(layer.ok for layer in report.layers),
    "kernel_sparsity": _kernel_sparsity(report),
    "seconds": seconds,
  }


def compact(value: Any, digits: int = 5) -> Any:
  """``value`` (JSON-ready) with every float rounded to ``digits`` significant digits.

  >>> compact({"a": [0.123456789, 2], "b": 1234567.0})
  {'a': [0.12346, 2], 'b': 1234600.0}
  """
  if isinstance(value, float):
    return float(f"{value:.{digits}g}")
  if isinstance(value, dict):
    return {k: compact(v, digits) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [compact(v, digits) for v in value]
  return value


def _save(path: pathlib.Path, runs: list[dict], meta: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(compact({"meta": meta, "runs": runs}), separators=(",", ":")))
  os.replace(tmp, path)


def compare(
  task: Task,
  *,
  recipe_names: Sequence[str],
  targets: Sequence[str | Mapping[str, str]],
  seeds: Sequence[int],
  settings: Settings = Settings(),
  out_dir: str | os.PathLike | None = None,
  resume: bool = False,
  progress: bool = True,
  plots: bool = True,
  meta: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
  """Trains every recipe x target x seed on ``task`` and writes the comparison's reports.

  The dense recipe is trained once per seed (it does not depend on the target) and shown in
  every target's row. With ``out_dir``, ``results.json`` (every run's record) is rewritten
  after each run, and at the end ``results.md`` (the tables), the PNG plots and
  ``figures.json`` (the data of every plot) are written (see :mod:`._report`).

  Args:
    task: the model and data (:func:`make_task`).
    recipe_names: names of ``recipes.RECIPE_NAMES``.
    targets: N:M targets, ``"ff=1:8,qkv=1:8"`` or ``{"ff": "1:8", "qkv": "1:8"}``.
    seeds: the seeds; every configuration is trained once per seed.
    settings: the training settings.
    out_dir: where to write; None writes nothing.
    resume: keep the runs of an existing ``results.json`` trained with the same settings (and
      drop the others), and train only the missing ones.
    progress: show a progress bar (tqdm) over all steps of all runs.
    plots: write the PNG plots (needs matplotlib).
    meta: extra JSON-ready information for the results file (machine, command).

  Returns:
    The records of all runs (see :func:`train_one`).

  Raises:
    ValueError: an unknown recipe, a malformed target, no seed, or a policy the model rejects.
  """
  unknown = [r for r in recipe_names if r not in recipes.RECIPE_NAMES]
  if unknown:
    raise ValueError(f"unknown recipes {unknown}; recipes: {', '.join(recipes.RECIPE_NAMES)}")
  if not seeds:
    raise ValueError("give at least one seed")
  parsed = [parse_target(t) for t in targets]
  if not parsed:
    raise ValueError("give at least one N:M target")
  plan = []
  for seed in seeds:
    if "dense" in recipe_names:
      plan.append(("dense", parsed[0], seed))
    for target in parsed:
      plan.extend((r, target, seed) for r in recipe_names if r != "dense")
  out = pathlib.Path(out_dir) if out_dir is not None else None
  results_path = out / "results.json" if out is not None else None
  meta = {
    "task": task.name,
    "description": task.description,
    "recipes": list(recipe_names),
    "targets": [target_label(t) for t in parsed],
    "seeds": list(seeds),
    "settings": dataclasses.asdict(settings),
    "jax": jax.__version__,
    **(meta or {}),
  }
  runs, previous = [], 0.0
  if resume and results_path is not None and results_path.is_file():
    saved = json.loads(results_path.read_text())
    runs = [r for r in saved["runs"] if settings.matches(r["settings"])]
    if len(runs) < len(saved["runs"]):
      print(f"resume: dropping {len(saved['runs']) - len(runs)} runs trained with other settings")
    previous = float(saved["meta"].get("wall_seconds", 0.0))
  done = {run_key(r["task"], r["recipe"], r["target"], r["seed"]) for r in runs}
  todo = [p for p in plan if run_key(task.name, *p) not in done]
  bar = _progress(len(todo) * settings.steps, progress)
  started = time.perf_counter()
  for index, (recipe_name, target, seed) in enumerate(todo):
    label = f"{recipe_name} {target_label(target)} seed {seed}"

    def on_step(step, loss, index=index, label=label):
      if bar is not None:
        bar.set_postfix_str(f"{label}  loss {loss:.3f}", refresh=False)
        bar.update(index * settings.steps + step + 1 - bar.n)

    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      record = train_one(task, recipe_name, target, seed, settings, on_step=on_step)
    record["warnings"] = sorted({str(w.message) for w in caught})
    runs.append(record)
    if results_path is not None:
      _save(results_path, runs, {**meta, "wall_seconds": previous + time.perf_counter() - started})
    if bar is None:
      print(f"{label}: accuracy {record['final_accuracy']:.4f} ({record['seconds']:.0f} s)")
  if bar is not None:
    bar.update(bar.total - bar.n)
    bar.close()
  meta["wall_seconds"] = previous + time.perf_counter() - started
  if out is not None:
    from ._report import write_reports

    _save(results_path, runs, meta)
    write_reports(runs, out, meta=meta, plots=plots)
  return runs


def _progress(total: int, enabled: bool):
  if not enabled or total == 0:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover - tqdm comes with the demo extra
    return None
  return tqdm(total=total, dynamic_ncols=True, unit="step")

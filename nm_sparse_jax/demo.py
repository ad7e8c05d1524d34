"""The built-in demonstration: a small ViT on scikit-learn's digits, dense vs N:M sparse.

``python -m nm_sparse_jax demo`` trains the same ViT with the dense baseline and with a chosen
recipe and N:M pattern per layer group, through the optax transformation and the Flax
``Sparsified`` wrapper, then finalizes the sparse model to hard N:M, verifies every selected
kernel along its contraction axis, and prints test accuracy, realised sparsity and inference
FLOPs (the paper's Appendix D).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nm_sparse_jax import policy as policy_lib
from nm_sparse_jax import recipes
from nm_sparse_jax.finalize import VerifyReport, finalize, verify
from nm_sparse_jax.flops import FlopsReport, attention_einsum_flops, inference_flops
from nm_sparse_jax.linen import Sparsified
from nm_sparse_jax.models.vit import VisionTransformer, ViTConfig
from nm_sparse_jax.transform import nm_sparsity, sparsity_step

__all__ = ["DemoConfig", "RunResult", "run_demo", "train_digits"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Settings of the demonstration (defaults take about a minute per run on 2 CPU cores)."""

  recipe: str = "mdgf_exponential"
  ff: str | None = "1:8"
  attention: str | None = None  # N:M of the query/key/value kernels
  steps: int = 1200
  batch: int = 64
  learning_rate: float = 2e-3
  dense_fraction: float = 0.1  # dense phase d / T
  fine_tune_fraction: float = 0.2  # fine-tune phase s / T
  seed: int = 0
  model: ViTConfig = ViTConfig(hidden=64, depth=3, heads=4, mlp_dim=256)


class RunResult(NamedTuple):
  """One trained model of the demo."""

  recipe: str
  groups: str
  test_accuracy: float
  final_loss: float
  report: VerifyReport | None
  flops: FlopsReport
  seconds: float


def _groups_text(ff: str | None, attention: str | None) -> str:
  parts = [f"FF {ff}"] if ff else []
  parts += [f"QKV {attention}"] if attention else []
  return " + ".join(parts) or "-"


def train_digits(
  config: DemoConfig,
  recipe_name: str,
  *,
  data: Sequence[Any],
  progress: bool = True,
) -> RunResult:
  """Trains the demo ViT with one recipe and evaluates its finalized (hard N:M) parameters."""
  (train, test) = data
  model_config = config.model
  total = config.steps
  dense_steps = round(config.dense_fraction * total)
  fine_tune_steps = round(config.fine_tune_fraction * total)
  recipe = recipes.get(
    recipe_name, total_steps=total, dense_steps=dense_steps, fine_tune_steps=fine_tune_steps
  )
  # The dense baseline runs the same code: the dense recipe on the same layer groups.
  policy = policy_lib.vit(recipe, ff=config.ff, qkv=config.attention)
  sparse = recipe_name != "dense"
  model = Sparsified(VisionTransformer(model_config), policy)
  key = jax.random.key(config.seed)
  params = model.init(key, jnp.asarray(train.images[:1]))["params"]
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, config.learning_rate, warmup_steps=max(total // 20, 1), decay_steps=total
  )
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, weight_decay=1e-4),
    nm_sparsity(policy),
  )
  opt_state = tx.init(params)

  def loss_fn(p, state, x, y):
    variables = {"params": p, "nm_sparsity": {"step": sparsity_step(state)}}
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(p, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, state, x, y)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  rng = np.random.default_rng(config.seed)
  order = np.array([], np.int64)
  groups = _groups_text(config.ff, config.attention) if sparse else "-"
  bar = _progress(total, f"{recipe_name:>16} {groups}", progress)
  start = time.perf_counter()
  loss = jnp.nan
  for step in range(total):
    if len(order) < config.batch:
      order = np.concatenate([order, rng.permutation(len(train.labels))])
    idx, order = order[: config.batch], order[config.batch :]
    params, opt_state, loss = train_step(
      params, opt_state, jnp.asarray(train.images[idx]), jnp.asarray(train.labels[idx])
    )
    if bar is not None and (step % 20 == 0 or step == total - 1):
      postfix = {"loss": f"{float(loss):.3f}"}
      if sparse:
        postfix["phase"] = ("dense", "sparsify", "fine-tune")[int(recipe.phase(step))]
        postfix["D"] = f"{float(recipe.decay(step)):.3f}"
      bar.set_postfix(postfix)
      bar.update(step + 1 - bar.n)
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start

  final = finalize(params, policy)
  inner = VisionTransformer(model_config)
  logits = jax.jit(inner.apply)({"params": final}, jnp.asarray(test.images))
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test.labels)))
  report = verify(final, policy) if sparse else None
  flops = inference_flops(
    final,
    policy if sparse else None,
    tokens=model_config.kernel_tokens,
    extra_dense_flops=attention_einsum_flops(
      tokens=model_config.tokens, hidden=model_config.hidden, layers=model_config.depth
    ),
  )
  return RunResult(
    recipe=recipe_name,
    groups=groups,
    test_accuracy=accuracy,
    final_loss=float(loss),
    report=report,
    flops=flops,
    seconds=seconds,
  )


def _progress(total: int, description: str, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover - tqdm comes with the demo extra
    return None
  return tqdm(total=total, desc=description, leave=True, dynamic_ncols=True)


def results_table(results: Sequence[RunResult]) -> str:
  """The demo's summary table."""
  rows = [
    (
      "recipe",
      "N:M",
      "test acc",
      "kernel sparsity",
      "N:M verified",
      "inference MFLOPs",
      "FLOPs saved",
      "train s",
    )
  ]
  for r in results:
    if r.report is not None and r.report.layers:
      total = sum(np.prod(layer.shape) for layer in r.report.layers)
      zeros = sum(layer.sparsity * np.prod(layer.shape) for layer in r.report.layers)
      sparsity = f"{zeros / total:.3f}"
      verified = f"{sum(layer.ok for layer in r.report.layers)}/{len(r.report.layers)} ok"
    else:
      sparsity, verified = "-", "-"
    rows.append(
      (
        r.recipe,
        r.groups,
        f"{100 * r.test_accuracy:.1f}%",
        sparsity,
        verified,
        f"{r.flops.sparse / 1e6:.2f}",
        f"{100 * r.flops.saved:.1f}%",
        f"{r.seconds:.0f}",
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run_demo(
  config: DemoConfig, *, baseline: bool = True, progress: bool = True
) -> list[RunResult]:
  """Runs the demonstration and prints the per-layer verification and the results table."""
  from nm_sparse_jax.data.digits import load_digits

  data = load_digits(seed=config.seed)
  print(
    f"digits: {len(data[0].labels)} train / {len(data[1].labels)} test images; "
    f"ViT {config.model.depth} layers, hidden {config.model.hidden}, {config.steps} steps "
    f"(dense {config.dense_fraction:.0%}, fine-tune {config.fine_tune_fraction:.0%}); "
    f"JAX {jax.__version__} on {jax.devices()[0].device_kind}"
  )
  names = (["dense"] if baseline and config.recipe != "dense" else []) + [config.recipe]
  results = [train_digits(config, name, data=data, progress=progress) for name in names]
  for r in results:
    if r.report is not None:
      print(f"\nN:M verification of the finalized {r.recipe} model:\n{r.report}")
  print("\n" + results_table(results))
  return results

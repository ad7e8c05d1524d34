"""Step-time and memory overhead of the sparsity transform in a ViT training step.

Times one jitted training step (forward, backward, AdamW, and for the sparse variants the
policy's ``W~`` and the ``nm_sparsity`` transformation) against the same step without any of
it, side by side in one run. Each variant is timed at a step inside its sparsification phase.
Memory is XLA's compiled memory plan (``memory_analysis()``: arguments + outputs + temporaries
- aliased), which exists on every backend and does not depend on what ran before.

    python -m nm_sparse_jax bench step [--preset cpu|gpu] [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from nm_sparse_jax import policy as policy_lib
from nm_sparse_jax import recipes
from nm_sparse_jax.bench._timing import device_description, interleaved_medians
from nm_sparse_jax.models.vit import VisionTransformer, ViTConfig
from nm_sparse_jax.transform import NMSparsityState, nm_sparsity

PRESETS = {
  # ViT-S/16-like on 224x224 images for a GPU; a small ViT on 32x32 images for a 2-core CPU.
  "gpu": (ViTConfig(224, 16, 3, 1000, 384, 12, 6, 1536), 128),
  "cpu": (ViTConfig(32, 4, 3, 10, 128, 4, 4, 512), 32),
  # For the test suite: every variant compiles and runs in seconds.
  "tiny": (ViTConfig(8, 2, 1, 10, 128, 1, 2, 512), 4),
}
TOTAL, DENSE, FINE_TUNE = 10_000, 1_000, 2_000


def variants():
  """(name, policy or None, step at which it is timed)."""

  def r(name, **kw):
    return recipes.get(name, total_steps=TOTAL, dense_steps=DENSE, fine_tune_steps=FINE_TUNE, **kw)

  return [
    ("no transform", None, 0),
    ("dense recipe", policy_lib.vit(recipes.dense(), ff="1:8"), 2_000),
    ("sr_ste FF 2:4", policy_lib.vit(r("sr_ste"), ff="2:4"), 2_000),
    ("mdgf_exponential FF 1:8", policy_lib.vit(r("mdgf_exponential"), ff="1:8"), 2_000),
    (
      "mdgf_exponential FF 1:8 + QKV 1:4",
      policy_lib.vit(r("mdgf_exponential"), ff="1:8", qkv="1:4"),
      2_000,
    ),
    ("sdgf_stepwise FF 1:8 (at 4:8)", policy_lib.vit(r("sdgf_stepwise"), ff="1:8"), 4_000),
    ("sdgf_geometric FF 1:8 (at 16:128)", policy_lib.vit(r("sdgf_geometric"), ff="1:8"), 1_500),
    ("mdgf_exponential FF 1:8, fine-tune", policy_lib.vit(r("mdgf_exponential"), ff="1:8"), 9_000),
  ]


def _train_step(model, policy, tx):
  def loss_fn(params, opt_state, images, labels):
    if policy is not None:
      step = next(
        s
        for s in jax.tree_util.tree_leaves(
          opt_state, is_leaf=lambda s: isinstance(s, NMSparsityState)
        )
        if isinstance(s, NMSparsityState)
      ).count
      params = policy.apply(params, step)
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, opt_state, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _at_step(opt_state, step: int):
  return jax.tree_util.tree_map(
    lambda s: (
      NMSparsityState(jnp.asarray(step, jnp.int32)) if isinstance(s, NMSparsityState) else s
    ),
    opt_state,
    is_leaf=lambda s: isinstance(s, NMSparsityState),
  )


def run(preset: str, *, reps: int) -> list[dict]:
  config, batch = PRESETS[preset]
  model = VisionTransformer(config)
  key_images, key_labels, key_init = jax.random.split(jax.random.key(0), 3)
  images = jax.random.normal(
    key_images, (batch, config.image_size, config.image_size, config.channels)
  )
  labels = jax.random.randint(key_labels, (batch,), 0, config.num_classes)
  params0 = model.init(key_init, images[:1])["params"]
  records, calls = [], []
  for name, policy, at in variants():
    chain = [optax.adamw(1e-4)] + ([nm_sparsity(policy)] if policy is not None else [])
    tx = optax.chain(*chain)
    step = _train_step(model, policy, tx)
    params = jax.tree_util.tree_map(jnp.copy, params0)
    opt_state = _at_step(tx.init(params), at)
    memory = step.lower(params, opt_state, images, labels).compile().memory_analysis()
    total = None
    if memory is not None:
      total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
      )
    state = {"params": params, "opt": opt_state}

    def call(state=state, step=step, at=at):
      # Reset the step counter each call, so that the step stays in the phase being timed.
      p, o, loss = step(state["params"], _at_step(state["opt"], at), images, labels)
      state["params"], state["opt"] = p, o
      return loss

    calls.append(call)
    records.append({"variant": name, "memory_bytes": total, "at_step": at})
  for record, seconds in zip(records, interleaved_medians(calls, reps=reps)):
    record["step_ms"] = seconds * 1e3
    memory = record["memory_bytes"]
    print(
      f"  {record['variant']:>36}: {seconds * 1e3:8.2f} ms/step  memory plan "
      f"{memory / 2**20 if memory else float('nan'):8.1f} MiB",
      flush=True,
    )
  base = records[0]
  for r in records:
    r["time_ratio"] = r["step_ms"] / base["step_ms"]
    r["memory_ratio"] = (r["memory_bytes"] / base["memory_bytes"]) if base["memory_bytes"] else None
  return records


def table(records: Sequence[dict]) -> str:
  rows = [("variant", "ms/step", "vs none", "memory MiB", "vs none")]
  for r in records:
    rows.append(
      (
        r["variant"],
        f"{r['step_ms']:.2f}",
        f"{r['time_ratio']:.3f}x",
        f"{r['memory_bytes'] / 2**20:.1f}" if r["memory_bytes"] else "-",
        f"{r['memory_ratio']:.3f}x" if r["memory_ratio"] else "-",
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join(
    "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    for row in rows
  )


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="nm_sparse_jax bench step", description=__doc__)
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: by backend")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--json", help="write the records to this file")
  args = parser.parse_args(argv)
  preset = args.preset or ("cpu" if jax.default_backend() == "cpu" else "gpu")
  config, batch = PRESETS[preset]
  print(
    f"training-step overhead on {device_description()}: ViT hidden {config.hidden}, "
    f"depth {config.depth}, {config.tokens} tokens, batch {batch}, AdamW",
    flush=True,
  )
  records = run(preset, reps=args.reps)
  print("\n" + table(records))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device_description(), "preset": preset, "records": records}, f, indent=1)
  return records

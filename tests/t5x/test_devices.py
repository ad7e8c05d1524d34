"""The same tiny sparse run on 1 CPU device and on 4 fake CPU devices (data 2 x model 2).

The 4-device runs use ``PjitPartitioner(num_partitions=None, model_parallel_submesh=(1, 2))``:
a (data=2, model=2) mesh (T5X logs that a 2-tuple submesh is deprecated on TPU; on CPU it is
the only form its hardware mesh takes). T5 1.1's logical axis rules shard ``wi_0``/``wi_1`` and
``query``/``key``/``value`` along their output axis (not the contraction axis), ``wo`` and
``out`` along the contraction axis in whole N:M groups (32 of 64 rows each), and split each
batch of 8 over the two data shards.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

MESH_2X2 = [
  "partitioning.PjitPartitioner.num_partitions=None",
  "partitioning.PjitPartitioner.model_parallel_submesh=(1, 2)",
]
# Per-step summaries (T5X reports the train metrics of each period; a period of 1 step gives the
# loss of every step).
EVERY_STEP = ["train.eval_period=1", "train.eval_steps=1"]


def partition_specs(checkpoint) -> dict[str, dict]:
  """The ``_sharding`` record of an Orbax T5X checkpoint: ``{dotted path: sharding}``."""
  raw = json.loads((checkpoint / "state" / "_sharding").read_text())
  return {base64.b64decode(k).decode(): json.loads(v) for k, v in raw.items()}


def assert_sharded_2x2(checkpoint):
  specs = partition_specs(checkpoint)
  expected = {
    "encoder.layers_0.mlp.wi_0.kernel": [None, "model"],
    "decoder.layers_1.self_attention.query.kernel": [None, "model"],
    "encoder.layers_1.mlp.wo.kernel": ["model", None],
  }
  for path, spec in expected.items():
    found = specs[f"target.{path}"]
    assert found["shape"] == [2, 2] and found["axis_names"] == ["data", "model"], found
    assert found["partition_spec"] == spec, (path, found)


def assert_same_curves(one, four, tags, *, rtol):
  for tag in tags:
    assert one[tag].keys() == four[tag].keys(), tag
    steps = sorted(one[tag])
    np.testing.assert_allclose(
      [four[tag][s] for s in steps], [one[tag][s] for s in steps], rtol=rtol, err_msg=tag
    )


@pytest.fixture(scope="module")
def adamw_runs(t5x_harness, sparse_gin):
  """MDGF-Linear (tiny/sparse.gin) with AdamW + nm_sparsity (tiny/optax.gin), 10 steps, on 1
  device and on the 2 x 2 mesh, with the same seed and data."""
  gin = [*sparse_gin, "tiny/optax.gin"]
  one, four = t5x_harness.root / "adamw_1dev", t5x_harness.root / "adamw_4dev"
  t5x_harness.train(one, gin, EVERY_STEP)
  t5x_harness.train(four, gin, [*EVERY_STEP, *MESH_2X2], devices=4)
  return one, four


def test_adamw_run_is_the_same_on_one_and_four_devices(t5x_harness, adamw_runs):
  """Every step's train and training-eval loss, the sparsity metrics and every final parameter
  agree to float rounding (reductions in another order); the final kernels, hard N:M after the
  fine-tune phase's projection, have the same N:M masks."""
  one, four = adamw_runs
  assert_sharded_2x2(four / "checkpoint_10")
  found = t5x_harness.summaries_of([d / f for f in ("train", "training_eval") for d in adamw_runs])
  for a, b in (found[:2], found[2:]):
    assert sorted(a["loss"]) == list(range(1, 11)), sorted(a["loss"])
    assert_same_curves(a, b, ["loss", "cross_ent_loss", "accuracy"], rtol=1e-5)
    nm_tags = [t for t in a if t.startswith("nm_sparsity/")]
    assert len(nm_tags) > 10
    for tag in nm_tags:
      assert a[tag] == b[tag], tag
  params = t5x_harness.compare_checkpoints(one / "checkpoint_10", four / "checkpoint_10")
  for path, r in params.items():
    assert r["diff"] <= 1e-5 * max(r["scale"], 1.0), (path, r)
  kernels = {p: r for p, r in params.items() if "same_mask" in r}
  assert len(kernels) == 30 and all(r["same_mask"] for r in kernels.values()), kernels
  t5x_harness.checkpoint("verify", four / "checkpoint_10", log="verify_adamw_4dev")


def test_adafactor_run_is_the_same_on_one_and_four_devices(t5x_harness, sparse_run, sparse_gin):
  """The default Adafactor (the 1-device run is ``sparse_run``): the same train losses, the same
  sparsity metrics and the same N:M masks of every selected kernel at step 10.

  Adafactor's update ``g / sqrt(v)`` (factored ``v``, lr 1.0 with rsqrt decay) turns the float
  noise of reordered reductions in near-zero gradients into visible steps: a few parameters (the
  token embedding, decoder layer 0's self-attention and its layer norm) end up to ~0.6% of their
  scale apart, and the training-eval loss of step 10 ~3e-4 apart. Stock T5X (tiny/pretrain.gin,
  no nm_sparse_jax) shows the same drift between these two meshes; the AdamW test above shows
  that the hook itself adds none.
  """
  four = t5x_harness.root / "adafactor_4dev"
  t5x_harness.train(four, sparse_gin, MESH_2X2, devices=4)
  assert_sharded_2x2(four / "checkpoint_10")
  a, b, eval_a, eval_b = t5x_harness.summaries_of(
    [d / f for f in ("train", "training_eval") for d in (sparse_run, four)]
  )
  assert_same_curves(a, b, ["loss", "cross_ent_loss", "accuracy"], rtol=1e-5)
  for tag in (t for t in a if t.startswith("nm_sparsity/")):
    assert a[tag] == b[tag], tag
  assert_same_curves(eval_a, eval_b, ["loss"], rtol=2e-3)
  params = t5x_harness.compare_checkpoints(sparse_run / "checkpoint_10", four / "checkpoint_10")
  for path, r in params.items():
    assert r["diff"] <= 3e-2 * max(r["scale"], 1.0), (path, r)
  kernels = {p: r for p, r in params.items() if "same_mask" in r}
  assert len(kernels) == 30 and all(r["same_mask"] for r in kernels.values()), kernels

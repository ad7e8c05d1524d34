"""SDGF-Geometric and SR-STE trained for real with ``python -m t5x.train`` on the tiny model.

The kernels a checkpoint holds are checked against the recipe: the pattern T5X's summaries report
at a step is the one found in the checkpoint's ``W~`` at that step (recomputed offline, and
against a NumPy top-n reference), and ``verify``/``export`` give hard N:M at the end.
"""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
import pytest

FF_KERNELS = [
  f"{stack}/layers_{i}/mlp/{name}/kernel"
  for stack in ("encoder", "decoder")
  for i in (0, 1)
  for name in ("wi_0", "wi_1", "wo")
]


def satisfied(report) -> dict[str, int]:
  """How many kernels of a ``--json`` verify report satisfy each pattern (all must be ok)."""
  layers = json.loads(pathlib.Path(report).read_text())["layers"]
  assert all(r["bad_groups"] == 0 for r in layers), layers
  return dict(collections.Counter(r["satisfied"] for r in layers))


@pytest.fixture(scope="module")
def geometric_run(t5x_harness, sparse_gin):
  """SDGF-Geometric, k = 8, 1:4 FF and 1:2 Q/K/V, T = 10, d = 1, s = 1, default Adafactor.

  Patterns (every tiny kernel fits k * M): FF 8:32, 4:16, 2:8, 1:4; Q/K/V 8:16, 4:8, 2:4, 1:2;
  two steps each: j = 1, 2 -> pattern 1; 3, 4 -> 2; 5, 6 -> 3; 7, 8 -> 4; j = 9 fine-tune (4).
  """
  model_dir = t5x_harness.root / "geometric"
  t5x_harness.train(
    model_dir,
    sparse_gin,
    [
      "NM_RECIPE='sdgf_geometric'",
      "recipes.get.k=8",
      "NM_DENSE_STEPS=1",
      "NM_FINE_TUNE_STEPS=1",
    ],
  )
  return model_dir


def test_sdgf_geometric_checkpoint_holds_the_pattern_the_summaries_report(
  t5x_harness, geometric_run
):
  """Training eval of step 5 runs on checkpoint_5's params at j = 5, pattern 3 = 2:8 (FF): the
  checkpoint's W~ at j = 5 keeps the 2 largest |W| of every group of 8 along the contraction
  axis -- an intermediate pattern, not yet 1:4 -- and export gives hard 1:4."""
  train, evals = t5x_harness.summaries_of(
    [geometric_run / "train", geometric_run / "training_eval"]
  )
  # Train summary of step k: j = k - 1; training eval of step k: j = k.
  assert train["nm_sparsity/ff/pattern"] == {5: 2.0, 10: 4.0}
  assert train["nm_sparsity/ff/phase"] == {5: 1.0, 10: 2.0}
  assert evals["nm_sparsity/step"] == {5: 5.0, 10: 10.0}
  assert evals["nm_sparsity/ff/pattern"] == {5: 3.0, 10: 4.0}
  assert evals["nm_sparsity/q/pattern"] == {5: 3.0, 10: 4.0}
  # Every geometric pattern has the target's density: D = 0 and 3/4 (FF), 1/2 (Q/K/V) zeros.
  assert set(evals["nm_sparsity/ff/sparsity"].values()) == {0.75}
  assert set(evals["nm_sparsity/v/sparsity"].values()) == {0.5}

  found = t5x_harness.python(
    f"""
    import json
    import jax, numpy as np
    from nm_sparse_jax import recipes
    from nm_sparse_jax.finalize import group_nonzeros
    from nm_sparse_jax.policy import path_str
    from nm_sparse_jax.t5x import t5_policy
    from nm_sparse_jax.t5x.checkpoint import load_state

    recipe = recipes.get("sdgf_geometric", total_steps=10, dense_steps=1, fine_tune_steps=1, k=8)
    policy = t5_policy(recipe, ff="1:4", attention="1:2")
    params = load_state({str(geometric_run / "checkpoint_5")!r})["target"]
    plan = policy.resolve(params)
    w = {{path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}}
    w_tilde = {{path_str(p): np.asarray(x) for p, x in
               jax.tree_util.tree_flatten_with_path(policy.apply(params, 5, plan=plan))[0]}}
    out = {{}}
    for path in {FF_KERNELS!r}:
      pattern = plan[path].patterns[{int(evals["nm_sparsity/ff/pattern"][5])} - 1]
      # NumPy reference: the n largest |W| of each group of m rows (axis 0) are kept.
      groups = np.abs(w[path]).reshape(-1, pattern.m, w[path].shape[1])
      rank = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1)
      reference = np.where((rank < pattern.n).reshape(w[path].shape), w[path], 0)
      out[path] = {{
        "pattern": str(pattern),
        "equal": bool(np.array_equal(w_tilde[path], reference)),
        "max_nonzeros": int(group_nonzeros(w_tilde[path], pattern.m).max()),
        "max_nonzeros_of_4": int(group_nonzeros(w_tilde[path], 4).max()),
      }}
    print(json.dumps(out))
    """,
    log="geometric_w_tilde",
  )
  expected = {"pattern": "2:8", "equal": True, "max_nonzeros": 2, "max_nonzeros_of_4": 2}
  assert found == {path: expected for path in FF_KERNELS}

  t5x_harness.checkpoint(
    "verify", geometric_run / "checkpoint_10", log="verify_geometric", expect_rc=1
  )  # Adafactor keeps the dense W
  report = t5x_harness.root / "export_geometric.json"
  t5x_harness.checkpoint(
    "export", geometric_run / "checkpoint_10", t5x_harness.root / "geometric_export",
    "--json", report, log="export_geometric", expect_rc=0,
  )  # fmt: skip
  assert satisfied(report) == {"1:4": 12, "1:2": 18}


def test_sr_ste_fine_tune_trains_on_w_phi_and_verifies(t5x_harness, sr_ste_glue_run):
  """SR-STE through glue/finetune.gin: dense for j < 2, then the forward pass runs on W * Phi
  (3/4 zeros, D = 0) with no fine-tune phase; AdamW keeps the dense W, so checkpoint_4 is not
  N:M as saved and export finalizes it; nm_sparsity projects the update that reaches the end of
  the schedule (j = T = 8), so checkpoint_8 is hard 1:4 as saved."""
  train, evals = t5x_harness.summaries_of(
    [sr_ste_glue_run / "train", sr_ste_glue_run / "training_eval"]
  )
  # Train summary of step k: j = k - 1 (start step 0); training eval: j = k.
  assert train["nm_sparsity/step"] == {2: 1.0, 4: 3.0, 6: 5.0, 8: 7.0}
  assert train["nm_sparsity/ff/phase"] == {2: 0.0, 4: 1.0, 6: 1.0, 8: 1.0}
  assert train["nm_sparsity/ff/sparsity"] == {2: 0.0, 4: 0.75, 6: 0.75, 8: 0.75}
  assert train["nm_sparsity/ff/decay"] == {2: 1.0, 4: 0.0, 6: 0.0, 8: 0.0}
  assert evals["nm_sparsity/ff/phase"] == {2: 1.0, 4: 1.0, 6: 1.0, 8: 2.0}
  assert "nm_sparsity/q/sparsity" not in evals  # FF only
  # Gradient-flow diagnostics with AdamW: Var(|g|) and Var(nu) of the FF kernels.
  for name in ("grad_abs_var", "nu_var"):
    values = train[f"nm_sparsity/ff/{name}"]
    assert sorted(values) == [2, 4, 6, 8] and all(v > 0 and np.isfinite(v) for v in values.values())

  _, out = t5x_harness.checkpoint(
    "verify", sr_ste_glue_run / "checkpoint_4", log="verify_sr_ste_4", expect_rc=1
  )
  assert "NOT N:M: 12 kernels" in out
  report = t5x_harness.root / "export_sr_ste.json"
  t5x_harness.checkpoint(
    "export", sr_ste_glue_run / "checkpoint_4", t5x_harness.root / "sr_ste_export",
    "--json", report, log="export_sr_ste", expect_rc=0,
  )  # fmt: skip
  assert satisfied(report) == {"1:4": 12}
  report = t5x_harness.root / "verify_sr_ste_8.json"
  t5x_harness.checkpoint(
    "verify", sr_ste_glue_run / "checkpoint_8", "--json", report, log="verify_sr_ste_8",
    expect_rc=0,
  )  # fmt: skip
  assert satisfied(report) == {"1:4": 12}

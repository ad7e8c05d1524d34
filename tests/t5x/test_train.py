"""Real ``python -m t5x.train`` / ``t5x.eval`` runs of the tiny configuration (gin/tiny/).

The schedule of ``gin/tiny/sparse.gin``: MDGF-Linear, T = 10, d = 2, s = 4, so D(j) = 1 - (j-2)/4
on [2, 6) and the fine-tune phase (hard 1:4 FF, 1:2 Q/K/V) is [6, 10). T5X's train summary of
step k reports the last step of its period, whose forward pass ran at j = k - 1 (from scratch);
the training-eval summary of step k runs at j = k.
"""

from __future__ import annotations

import base64
import json

import numpy as np

FF_KERNEL = "encoder/layers_0/mlp/wo/kernel"
Q_KERNEL = "decoder/layers_1/self_attention/query/kernel"


def test_training_reaches_fine_tune_phase_with_metrics_in_summaries(t5x_harness, sparse_run):
  assert json.loads((sparse_run / "nm_sparsity.json").read_text()) == {"start_step": 0}
  train, evals = t5x_harness.summaries_of([sparse_run / "train", sparse_run / "training_eval"])
  # Step 5: j = 4, D = 0.5; step 10: j = 9, fine-tune phase, hard N:M.
  assert train["nm_sparsity/step"] == {5: 4.0, 10: 9.0}
  assert train["nm_sparsity/ff/decay"] == {5: 0.5, 10: 0.0}
  assert train["nm_sparsity/ff/phase"] == {5: 1.0, 10: 2.0}
  assert train["nm_sparsity/ff/pattern"] == {5: 1.0, 10: 1.0}
  assert train["nm_sparsity/ff/density"] == {5: 0.25, 10: 0.25}
  assert train["nm_sparsity/ff/sparsity"] == {5: 0.0, 10: 0.75}
  for group in ("q", "k", "v"):
    assert train[f"nm_sparsity/{group}/sparsity"][10] == 0.5
  assert "nm_sparsity/o/sparsity" not in train  # NM_ATTENTION_LAYERS = 'qkv'
  # Gradient-flow diagnostics: Var(|g|) per group; no Var(nu) with Adafactor (factored moments).
  for group in ("ff", "q", "k", "v"):
    assert all(
      v > 0 and np.isfinite(v) for v in train[f"nm_sparsity/{group}/grad_abs_var"].values()
    )
  assert not any(k.endswith("/nu_var") for k in train)
  assert evals["nm_sparsity/step"] == {5: 5.0, 10: 10.0}
  assert evals["nm_sparsity/ff/decay"][5] == 0.25
  assert np.isfinite(train["loss"][10])


def test_verify_fails_on_dense_weights_and_export_writes_hard_nm(t5x_harness, sparse_run):
  checkpoint = sparse_run / "checkpoint_10"
  # Adafactor keeps the dense W (the model computes with W * Phi): not N:M as stored.
  rc, out = t5x_harness.checkpoint("verify", checkpoint, log="verify_raw", expect_rc=1)
  assert "NOT N:M" in out
  report = t5x_harness.root / "export.json"
  exported = t5x_harness.root / "exported"
  _, out = t5x_harness.checkpoint(
    "export", checkpoint, exported, "--json", report, log="export", expect_rc=0
  )
  assert "OK: every selected kernel is N:M" in out
  layers = {r["path"]: r for r in json.loads(report.read_text())["layers"]}
  # 4 layers x (wi_0, wi_1, wo) + encoder 2 x (q, k, v) + decoder 2 x 2 attentions x (q, k, v).
  assert len(layers) == 12 + 6 + 12
  assert layers[FF_KERNEL]["satisfied"] == "1:4" and layers[FF_KERNEL]["sparsity"] == 0.75
  assert layers[Q_KERNEL]["satisfied"] == "1:2"
  # The pattern flags give the same answer as the run's config.gin.
  t5x_harness.checkpoint(
    "verify", exported / "checkpoint_10", "--ff", "1:4", "--attention", "1:2",
    log="verify_flags", expect_rc=0,
  )  # fmt: skip


def test_eval_with_model_gin_matches_plain_t5x_eval_of_export(t5x_harness, sparse_run):
  """t5x.eval with the model gin only (no trainer gin) decodes with the final W * Phi; plain T5X
  gin on the exported checkpoint gives the same predictions."""
  exported = t5x_harness.root / "exported_for_eval"
  t5x_harness.checkpoint(
    "export", sparse_run / "checkpoint_10", exported, log="export_for_eval", expect_rc=0
  )
  sparse_out, plain_out = t5x_harness.root / "eval_sparse", t5x_harness.root / "eval_plain"
  t5x_harness.evaluate(
    sparse_run / "checkpoint_10", sparse_out, ["tiny/eval.gin", "tiny/sparse.gin"]
  )
  t5x_harness.evaluate(exported / "checkpoint_10", plain_out, ["tiny/eval.gin"])
  assert "nm_t5x" not in (plain_out / "config.gin").read_text()
  assert "nm_t5x.sparsify_model" in (sparse_out / "config.gin").read_text()
  plain = t5x_harness.predictions(plain_out, "nm_tiny_classify")
  assert t5x_harness.predictions(sparse_out, "nm_tiny_classify") == plain
  assert len(plain) == 16


def test_resume_across_phase_boundary_continues_schedule(t5x_harness, sparse_run, sparse_gin):
  """5 steps, then a restart to 10 (crossing into the fine-tune phase at j = 6): the same
  parameters and summaries as the uninterrupted run."""
  model_dir = t5x_harness.root / "resumed"
  t5x_harness.train(model_dir, sparse_gin, ["TRAIN_STEPS=5"], log="resume_part1")
  t5x_harness.train(model_dir, sparse_gin, ["TRAIN_STEPS=10"], log="resume_part2")
  assert json.loads((model_dir / "nm_sparsity.json").read_text()) == {"start_step": 0}
  train = t5x_harness.summaries(model_dir / "train")
  assert train["nm_sparsity/step"] == {5: 4.0, 10: 9.0}
  assert train["nm_sparsity/ff/phase"][10] == 2.0
  resumed = t5x_harness.params(model_dir / "checkpoint_10", [FF_KERNEL, Q_KERNEL])
  straight = t5x_harness.params(sparse_run / "checkpoint_10", [FF_KERNEL, Q_KERNEL])
  for path in (FF_KERNEL, Q_KERNEL):
    np.testing.assert_allclose(resumed[path], straight[path], rtol=1e-6, atol=1e-7)


def test_fine_tune_from_dense_checkpoint_schedule_starts_at_its_step(t5x_harness, dense_run):
  """Fine-tuning from the dense checkpoint_10: j = step - 10 with no user arithmetic, exact with
  2 microbatches, and the start step survives a restart (15, then 20)."""
  model_dir = t5x_harness.root / "finetune"
  gin = ["tiny/finetune.gin", "tiny/sparse.gin", "nm/trainer.gin"]
  bindings = [
    f"INITIAL_CHECKPOINT_PATH='{dense_run / 'checkpoint_10'}'",
    "trainer.Trainer.num_microbatches=2",
  ]
  t5x_harness.train(model_dir, gin, [*bindings, "TRAIN_STEPS=15"], log="finetune_part1")
  assert json.loads((model_dir / "nm_sparsity.json").read_text()) == {"start_step": 10}
  t5x_harness.train(model_dir, gin, [*bindings, "TRAIN_STEPS=20"], log="finetune_part2")
  train = t5x_harness.summaries(model_dir / "train")
  assert train["nm_sparsity/step"] == {15: 4.0, 20: 9.0}
  assert train["nm_sparsity/ff/decay"] == {15: 0.5, 20: 0.0}
  assert train["nm_sparsity/ff/phase"][20] == 2.0
  assert "microbatches" in (t5x_harness.root / "finetune_part1.log").read_text()
  assert list((model_dir / "inference_eval").glob("*.jsonl"))  # decoding on the final weights


def test_optax_chain_state_is_partitioned_on_two_devices(t5x_harness, sparse_gin):
  """AdamW + nm_sparsity on 2 CPU devices: NMSparsityState gets its partition rule (replicated
  count), kernels are sharded, and the projection makes the saved checkpoint exactly N:M."""
  model_dir = t5x_harness.root / "optax_2dev"
  t5x_harness.train(model_dir, [*sparse_gin, "tiny/optax.gin"], devices=2)
  info = (model_dir / "model-info.txt").read_text()
  count_lines = [line for line in info.splitlines() if "param_states/1/count" in line]
  assert len(count_lines) == 1 and count_lines[0].endswith("partition spec None"), count_lines
  raw = json.loads((model_dir / "checkpoint_10" / "state" / "_sharding").read_text())
  sharding = {base64.b64decode(k).decode(): json.loads(v) for k, v in raw.items()}
  wo = sharding["target.encoder.layers_0.mlp.wo.kernel"]
  assert wo["shape"] == [1, 2] and wo["partition_spec"][0] == "model", wo
  count = [v for k, v in sharding.items() if k.endswith("param_states.1.count")]
  assert len(count) == 1 and count[0]["partition_spec"] == [], sorted(sharding)
  t5x_harness.checkpoint("verify", model_dir / "checkpoint_10", log="verify_optax", expect_rc=0)


def test_groups_straddling_shards_are_refused(t5x_harness, sparse_gin):
  """1:16 on wo (64 rows) split over 8 devices gives 8 rows per shard: a clear error."""
  model_dir = t5x_harness.root / "straddle"
  _, out = t5x_harness.train(
    model_dir,
    sparse_gin,
    ["NM_FF='1:16'", "network.T5Config.num_heads=8", "network.T5Config.head_dim=4"],
    devices=8,
    expect_rc=1,
  )
  assert "straddle shard boundaries" in out
  assert "mlp/wo/kernel: axis 0 of size 64 is split over 8 devices" in out


def test_glue_configuration_fine_tunes_tiny_model_from_adafactor_checkpoint(
  t5x_harness, glue_from_step_10, tiny_run
):
  """glue/finetune.gin + a Table 4 file, shrunk: AdamW + nm_sparsity restored from an Adafactor
  checkpoint (fresh optimizer state), SDGF-Stepwise 1:8 FF + 1:8 QK over 8 steps from step 10;
  the last checkpoint is exactly N:M as saved."""
  model_dir = t5x_harness.root / "glue_tiny"
  t5x_harness.train(
    model_dir,
    ["glue/finetune.gin", "glue/ff1-8_qk1-8_sdgf_stepwise_10k_dense.gin", "tiny/arch.gin"],
    [
      *tiny_run,
      "MIXTURE_OR_TASK_NAME='nm_tiny_classify'",
      *glue_from_step_10,
    ],
  )
  assert json.loads((model_dir / "nm_sparsity.json").read_text()) == {"start_step": 10}
  train = t5x_harness.summaries(model_dir / "train")
  assert train["nm_sparsity/ff/phase"][18] == 2.0 and train["nm_sparsity/ff/density"][18] == 0.125
  assert train["nm_sparsity/q/sparsity"][18] == 0.875 and "nm_sparsity/v/sparsity" not in train
  t5x_harness.checkpoint("verify", model_dir / "checkpoint_18", log="verify_glue", expect_rc=0)


def test_wmt_configuration_trains_tiny_model_from_scratch(t5x_harness, wmt_run):
  """wmt/train.gin + a Table 5 file, shrunk: Adam + nm_sparsity, MDGF-Exponential 1:16 on the
  single-ReLU FF (mlp/wi, mlp/wo), with T5X's BLEU-style inference eval (beam search)."""
  train = t5x_harness.summaries(wmt_run / "train")
  assert train["nm_sparsity/ff/phase"][8] == 2.0 and train["nm_sparsity/ff/sparsity"][8] == 15 / 16
  assert list((wmt_run / "inference_eval").glob("*.jsonl"))
  t5x_harness.checkpoint("verify", wmt_run / "checkpoint_8", log="verify_wmt", expect_rc=0)


def test_stock_trainer_with_sparse_model_is_refused(t5x_harness):
  """The model gin without the trainer gin would train on a wrong schedule: a clear error."""
  _, out = t5x_harness.train(
    t5x_harness.root / "no_trainer", ["tiny/pretrain.gin", "tiny/sparse.gin"], expect_rc=1
  )
  assert "loss_fn needs nm_step" in out and "nm/trainer.gin" in out

"""gin/glue/eval.gin and gin/wmt/eval.gin run for real with ``python -m t5x.eval``.

Each eval file is shrunk the way the GLUE/WMT training tests shrink their run files
(``tiny/arch.gin`` and the tiny offline task), and evaluates a checkpoint of a run trained with
the matching run file two ways: the exported hard-N:M checkpoint with plain gin (no
``nm_sparse_jax`` in the gin at all), and the training checkpoint as saved (dense ``W``) with the
run's configuration file added. Both must decode the same.
"""

from __future__ import annotations

import json

# Shrinks an eval file to the tiny model and tasks (eval.gin auto-computes feature lengths).
EVAL_TINY = ["MIXTURE_OR_TASK_MODULE=None", "utils.DatasetConfig.batch_size=8"]


def metrics(eval_dir, task: str) -> list[dict]:
  path = eval_dir / "inference_eval" / f"{task}-metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_glue_eval_gin_on_exported_and_on_training_checkpoint(t5x_harness, sr_ste_glue_run):
  """SR-STE 1:4 FF checkpoint_4 (dense W as saved): plain glue/eval.gin on its export and
  glue/eval.gin + glue/ff1-4_sr_ste_10k_dense.gin on it decode the same 16 examples; plain
  glue/eval.gin on the training checkpoint (the dense W, wrongly) decodes differently."""
  checkpoint = sr_ste_glue_run / "checkpoint_4"
  exported = t5x_harness.root / "glue_eval_export"
  t5x_harness.checkpoint("export", checkpoint, exported, log="export_glue_eval", expect_rc=0)
  bindings = [*EVAL_TINY, "MIXTURE_OR_TASK_NAME='nm_tiny_classify'"]
  plain, sparse, dense = (t5x_harness.root / f"glue_eval_{n}" for n in ("plain", "sparse", "dense"))
  t5x_harness.evaluate(
    exported / "checkpoint_4", plain, ["glue/eval.gin", "tiny/arch.gin"], bindings
  )
  t5x_harness.evaluate(
    checkpoint,
    sparse,
    ["glue/eval.gin", "glue/ff1-4_sr_ste_10k_dense.gin", "tiny/arch.gin"],
    bindings,
  )
  t5x_harness.evaluate(checkpoint, dense, ["glue/eval.gin", "tiny/arch.gin"], bindings)
  assert "nm_t5x" not in (plain / "config.gin").read_text()
  assert "nm_t5x.sparsify_model" in (sparse / "config.gin").read_text()
  expected = t5x_harness.predictions(plain, "nm_tiny_classify")
  assert len(expected) == 16 and len(set(expected)) > 4, expected
  assert t5x_harness.predictions(sparse, "nm_tiny_classify") == expected
  assert t5x_harness.predictions(dense, "nm_tiny_classify") != expected
  assert metrics(plain, "nm_tiny_classify") == metrics(sparse, "nm_tiny_classify")
  assert metrics(plain, "nm_tiny_classify")[0]["step"] == 4


def test_wmt_eval_gin_on_exported_and_on_training_checkpoint(t5x_harness, wmt_run):
  """MDGF-Exponential 1:16 checkpoint_4 (j = 4, before the fine-tune phase: dense W as saved):
  plain wmt/eval.gin on its export and wmt/eval.gin + wmt/ff1-16_mdgf_exponential.gin on it
  decode the same, with wmt/eval.gin's beam search (num_decodes = 4) on the sparse model's
  gin-generated model class."""
  checkpoint = wmt_run / "checkpoint_4"
  _, out = t5x_harness.checkpoint("verify", checkpoint, log="verify_wmt_4", expect_rc=1)
  assert "NOT N:M: 8 kernels" in out
  exported = t5x_harness.root / "wmt_eval_export"
  t5x_harness.checkpoint("export", checkpoint, exported, log="export_wmt_eval", expect_rc=0)
  bindings = [
    *EVAL_TINY,
    "MIXTURE_OR_TASK_NAME='nm_tiny_copy'",
    "utils.DatasetConfig.split='validation'",  # wmt/eval.gin: newstest2014, the task's test split
  ]
  plain, sparse = t5x_harness.root / "wmt_eval_plain", t5x_harness.root / "wmt_eval_sparse"
  t5x_harness.evaluate(
    exported / "checkpoint_4", plain, ["wmt/eval.gin", "tiny/arch.gin"], bindings
  )
  t5x_harness.evaluate(
    checkpoint,
    sparse,
    ["wmt/eval.gin", "wmt/ff1-16_mdgf_exponential.gin", "tiny/arch.gin"],
    bindings,
  )
  plain_config, sparse_config = (d.joinpath("config.gin").read_text() for d in (plain, sparse))
  assert "nm_t5x" not in plain_config and "nm_t5x.sparsify_model" in sparse_config
  assert "num_decodes = 4" in plain_config and "num_decodes = 4" in sparse_config
  expected = t5x_harness.predictions(plain, "nm_tiny_copy")
  assert len(expected) == 16 and len(set(expected)) > 4, expected
  assert t5x_harness.predictions(sparse, "nm_tiny_copy") == expected
  assert metrics(plain, "nm_tiny_copy") == metrics(sparse, "nm_tiny_copy")

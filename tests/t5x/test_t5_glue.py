"""T5's registered GLUE task ``glue_cola_v002`` through gin/glue/, offline.

``import t5.data.mixtures`` registers ``glue_cola_v002``: a ``TfdsDataSource("glue/cola:1.0.0")``,
T5's GLUE text preprocessor (``"cola sentence: ..."`` -> ``"acceptable"``/``"unacceptable"``),
its postprocessor (label name -> class id) and metric (Matthews correlation). The test writes a
tiny prepared ``glue/cola:1.0.0`` into a temporary ``--tfds_data_dir`` and runs glue/finetune.gin
and glue/eval.gin with the tiny network (``tiny/network.gin``) but T5's own vocabulary, through
``offline_t5.py``, which serves reads of T5's SentencePiece file (on GCS) from the small model
in the seqio wheel. See offline_t5.py for what is and is not the real thing.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

pytestmark = pytest.mark.skipif(
  any(importlib.util.find_spec(m) is None for m in ("t5", "tensorflow_datasets")),
  reason="needs t5 (pip install --no-deps t5==0.9.4, see the README's T5X section) and tfds",
)

OFFLINE = pathlib.Path(__file__).with_name("offline_t5.py")
CONFIG = "glue/ff1-4_sdgf_stepwise_10k_dense.gin"
TASK = "glue_cola_v002"


@pytest.fixture(scope="module")
def offline(t5x_harness):
  """``(via, flags)`` for Harness.train/evaluate: the wrapper and the prepared TFDS folder."""
  data_dir = t5x_harness.root / "tfds"
  t5x_harness.run([OFFLINE, "write-cola", data_dir], log="write_cola")
  seqio_dir = importlib.util.find_spec("seqio").submodule_search_locations[0]
  spm = pathlib.Path(seqio_dir, "test_data", "sentencepiece", "sentencepiece.model")
  return [OFFLINE, "run", spm], [f"--tfds_data_dir={data_dir}"]


def inferences(model_dir, step: int) -> list[dict]:
  path = model_dir / "inference_eval" / f"{TASK}-{step:06d}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_glue_cola_fine_tunes_and_evaluates_with_t5_preprocessors_and_metric(
  t5x_harness, glue_from_step_10, tiny_run, offline
):
  """glue/finetune.gin + a Table 4 file on glue_cola_v002 (SDGF-Stepwise 1:4, 8 steps from the
  dense checkpoint_10): T5X's vocabulary check passes with T5's vocabulary, the inference eval
  decodes T5's preprocessed inputs and reports the Matthews correlation, the last checkpoint is
  exactly 1:4, and glue/eval.gin + the same file decodes it as the training run did."""
  via, flags = offline
  model_dir = t5x_harness.root / "cola"
  t5x_harness.train(
    model_dir,
    ["glue/finetune.gin", CONFIG, "tiny/network.gin"],
    [
      *(b for b in tiny_run if not b.startswith("MIXTURE_OR_TASK_MODULE")),
      f"MIXTURE_OR_TASK_NAME='{TASK}'",
      *glue_from_step_10,
    ],
    flags=flags,
    via=via,
  )
  config = (model_dir / "config.gin").read_text()
  assert "MIXTURE_OR_TASK_MODULE = 't5.data.mixtures'" in config
  assert "'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'" in config
  assert "extra_ids = 100" in config
  metrics = (model_dir / "inference_eval" / f"{TASK}-metrics.jsonl").read_text().splitlines()
  assert [sorted(json.loads(line)) for line in metrics] == [["matthews_corrcoef", "step"]] * 2
  final = inferences(model_dir, 18)
  assert len(final) == 16
  assert all(r["input"]["inputs_pretokenized"].startswith("cola sentence: ") for r in final)
  labels = {r["input"]["targets_pretokenized"]: r["target"] for r in final}
  assert labels == {"unacceptable": 0, "acceptable": 1}
  train = t5x_harness.summaries(model_dir / "train")
  assert train["nm_sparsity/ff/phase"][18] == 2.0 and train["nm_sparsity/ff/sparsity"][18] == 0.75
  t5x_harness.checkpoint("verify", model_dir / "checkpoint_18", log="verify_cola", expect_rc=0)

  eval_dir = t5x_harness.root / "cola_eval"
  t5x_harness.evaluate(
    model_dir / "checkpoint_18",
    eval_dir,
    ["glue/eval.gin", CONFIG, "tiny/network.gin"],
    [f"MIXTURE_OR_TASK_NAME='{TASK}'", "utils.DatasetConfig.batch_size=8"],
    flags=flags,
    via=via,
  )
  evaluated = inferences(eval_dir, 18)
  assert [r["prediction"] for r in evaluated] == [r["prediction"] for r in final]
  assert "matthews_corrcoef" in (eval_dir / "inference_eval" / f"{TASK}-metrics.jsonl").read_text()

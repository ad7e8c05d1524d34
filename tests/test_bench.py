"""The benchmarks run and their masks are right; timings are printed, never asserted."""

import json

import jax

from nm_sparse_jax.bench import masks as bench_masks
from nm_sparse_jax.bench import step as bench_step


def test_mask_benchmark_checks_every_pattern(tmp_path, capsys):
  out = tmp_path / "masks.json"
  with jax.numpy_dtype_promotion("standard"):
    records = bench_masks.main(
      ["--shapes", "128x64", "--dtypes", "float32,bfloat16", "--copies", "1", "--reps", "3",
       "--json", str(out)]
    )  # fmt: skip
  assert len(records) == 2 * len(bench_masks.PATTERNS)
  assert all(r["correct"] for r in records)
  assert all(r["mask_us"] > 0 and r["multiply_us"] > 0 for r in records)
  saved = json.loads(out.read_text())
  assert saved["records"] == records and "JAX" in saved["device"]
  assert "nm_mask time / x*y time" in capsys.readouterr().out


def test_step_benchmark_runs_every_variant(tmp_path):
  out = tmp_path / "step.json"
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    records = bench_step.main(["--preset", "tiny", "--reps", "3", "--json", str(out)])
  assert [r["variant"] for r in records] == [v[0] for v in bench_step.variants()]
  assert records[0]["time_ratio"] == 1.0
  assert all(r["memory_bytes"] and r["step_ms"] > 0 for r in records)

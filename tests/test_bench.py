"""The benchmarks run and their masks are right; timings are printed, never asserted."""

import json

import jax
import pytest

from nm_sparse_jax.bench import masks as bench_masks
from nm_sparse_jax.bench import spmm as bench_spmm
from nm_sparse_jax.bench import step as bench_step
from nm_sparse_jax.bench._profile import _per_candidate


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
  on_gpu = jax.default_backend() == "gpu"
  assert all((r["gpu_ratio"] is not None) == on_gpu for r in records)


def test_mask_table_shows_wall_or_gpu_ratios():
  record = dict(shape="8x4", dtype="float32", pattern="2:4", correct=True, ratio=1.5,
                multiply_us=10.0, gpu_ratio=0.75, multiply_gpu_us=4.0)  # fmt: skip
  wall, gpu = bench_masks.table([record]), bench_masks.table([record], gpu=True)
  assert "1.50x" in wall and "10.0" in wall and "0.75x" not in wall
  assert "0.75x" in gpu and "4.0" in gpu and "1.50x" not in gpu


def test_step_benchmark_runs_every_variant(tmp_path):
  out = tmp_path / "step.json"
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    records = bench_step.main(["--preset", "tiny", "--reps", "3", "--json", str(out)])
  assert [r["variant"] for r in records] == [v[0] for v in bench_step.variants()]
  assert records[0]["time_ratio"] == 1.0
  assert all(r["memory_bytes"] and r["step_ms"] > 0 for r in records)


def test_profile_clusters_split_at_gaps_and_group_by_kernel():
  # Two candidates, 2 calls each, separated by an idle gap (microseconds, as in a trace).
  ev = [
    dict(name="gemm", ts=0.0, dur=5.0),
    dict(name="reduce", ts=6.0, dur=1.0),
    dict(name="gemm", ts=8.0, dur=5.0),
    dict(name="reduce", ts=14.0, dur=1.0),
    dict(name="nm_matmul", ts=10_000.0, dur=4.0),
    dict(name="nm_matmul", ts=10_005.0, dur=4.0),
  ]
  times = _per_candidate(ev, 2, calls=2, gap_s=0.005)
  assert times[0] == pytest.approx({"gemm": 5e-6, "reduce": 1e-6})
  assert times[1] == pytest.approx({"nm_matmul": 4e-6})
  assert _per_candidate(ev, 3, calls=2, gap_s=0.005) is None  # clusters != candidates
  assert _per_candidate([], 1, calls=1, gap_s=0.005) is None


def test_profile_clusters_drop_the_l2_flushes():
  # Two candidates, 2 calls each, every call after a flush, all separated by idle gaps.
  ev, ts = [], 0.0
  for name in ("gemm", "gemm", "nm_matmul", "nm_matmul"):
    ev.append(dict(name="loop_add_fusion", ts=ts, dur=90.0))
    ev.append(dict(name=name, ts=ts + 10_000.0, dur=5.0 if name == "gemm" else 3.0))
    ts += 20_000.0
  times = _per_candidate(ev, 2, calls=2, gap_s=0.005, flushed=True)
  assert times == [pytest.approx({"gemm": 5e-6}), pytest.approx({"nm_matmul": 3e-6})]
  assert _per_candidate(ev, 2, calls=2, gap_s=0.005) is None  # 8 clusters, not 2
  assert _per_candidate(ev[:-1], 2, calls=2, gap_s=0.005, flushed=True) is None


def test_mask_benchmark_saves_each_record_as_it_goes(tmp_path):
  # A run cut short (here by a bad second pattern) keeps the records measured before it.
  out = tmp_path / "masks.json"
  with pytest.raises(ValueError, match="3:2"):
    bench_masks.main(
      ["--shapes", "16x8", "--dtypes", "float32", "--patterns", "2:4,3:2", "--copies", "1",
       "--reps", "1", "--json", str(out)]
    )  # fmt: skip
  saved = json.loads(out.read_text())
  assert [r["pattern"] for r in saved["records"]] == ["2:4"] and saved["records"][0]["correct"]


def test_spmm_table_marks_cases_timed_by_wall_clock():
  # One case with GPU time, one whose trace did not split into the candidates (wall time only).
  def record(t, path, pattern, us, timer):
    speedup = 10.0 / us if path != "dense" else 1.0
    return dict(shape="64x32", tokens=t, path=path, pattern=pattern, us=us, wall_us=us + 9,
                ok=True, timer=timer, speedup_vs_dense=speedup, speedup_vs_2_4=None,
                wall_speedup_vs_dense=None, wall_speedup_vs_2_4=None)  # fmt: skip

  gpu = [record(1, "dense", "dense", 10.0, "gpu"), record(1, "nm", "1:8", 2.5, "gpu")]
  wall = [record(4, "dense", "dense", 19.0, "wall"), record(4, "nm", "1:8", 12.0, "wall")]
  mixed = bench_spmm.table(gpu + wall)
  assert mixed.startswith("GPU kernel time (rows marked (wall): wall time, dispatch included)")
  lines = mixed.splitlines()
  assert any("nm (wall)" in line and "12.0" in line for line in lines)
  assert not any("(wall)" in line and "2.5" in line for line in lines)
  assert bench_spmm.table(gpu).startswith("GPU kernel time, us per product")
  assert bench_spmm.table(wall).startswith("wall time (dispatch included), us per product")
  assert bench_spmm.table(gpu + wall, "wall_us").startswith("wall time (dispatch included), us")

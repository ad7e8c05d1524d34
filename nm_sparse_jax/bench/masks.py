"""Cost of ``nm_mask`` relative to one elementwise multiply ``x * y`` of the same arrays.

Each timed call processes ``copies`` distinct arrays (so that on a GPU the working set exceeds
the L2 cache); wall times are medians over ``reps`` calls. On a GPU the kernels' own time is
also read from a profiler trace (``gpu_ratio``): wall time includes the host's dispatch of each
kernel, about 8-10 µs for a Pallas call that XLA cannot put in a CUDA graph, which inside a
training step overlaps the GPU's work on earlier kernels. Every mask is checked against a NumPy
reference (stable sort of ``-|x|`` per group) before it is timed.

    python -m nm_sparse_jax bench masks [--shapes 768x2048,2048x768] [--dtypes float32,bfloat16]
        [--patterns 2:4,1:4,...] [--copies 8] [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Sequence

import jax
import numpy as np

from nm_sparse_jax._masks import nm_mask, parse_nm
from nm_sparse_jax.bench._profile import gpu_kernel_seconds
from nm_sparse_jax.bench._timing import device_description, interleaved_medians

PATTERNS = ("2:4", "1:4", "1:8", "1:16", "1:32", "1:128", "4:8", "16:128")
# T5 1.1 base FF kernels (wi: 768x2048, wo: 2048x768); groups along axis 0, the input axis.
SHAPES = ("768x2048", "2048x768")


def reference_mask(x: np.ndarray, n: int, m: int) -> np.ndarray:
  """NumPy N:M mask along axis 0: the n largest |x| per group, ties to the lower index."""
  x = np.abs(np.asarray(x, np.float32))
  groups = x.reshape(x.shape[0] // m, m, -1)
  order = np.argsort(-groups, axis=1, kind="stable")
  keep = np.zeros(groups.shape, bool)
  np.put_along_axis(keep, order[:, :n], True, axis=1)
  return keep.reshape(x.shape)


def run(
  shapes: Sequence[tuple[int, ...]],
  dtypes: Sequence[str],
  patterns: Sequence[str],
  *,
  copies: int,
  reps: int,
  on_record: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
  """Measures every (shape, dtype, pattern); returns one record per measurement.

  ``on_record(records)``, if given, is called with the records so far after each one (``main``
  writes the JSON file there, so that a run cut short keeps what it measured).
  """
  records = []
  for shape in shapes:
    for dtype in dtypes:
      keys = jax.random.split(jax.random.key(0), 2 * copies)
      xs = [jax.random.normal(k, shape, dtype) for k in keys[:copies]]
      ys = [jax.random.normal(k, shape, dtype) for k in keys[copies:]]
      multiply = jax.jit(lambda a, b: [u * v for u, v in zip(a, b)])
      for text in patterns:
        n, m = parse_nm(text)
        masks = jax.jit(lambda a, n=n, m=m: [nm_mask(u, n, m, axis=0) for u in a])
        got = np.asarray(masks(xs[:1])[0])
        correct = bool(np.array_equal(got, reference_mask(np.asarray(xs[0], np.float32), n, m)))
        fns = [functools.partial(masks, xs), functools.partial(multiply, xs, ys)]
        seconds, base = (t / copies for t in interleaved_medians(fns, reps=reps))
        gpu = gpu_kernel_seconds(fns, calls=5)
        gpu_mask, gpu_base = (t / copies for t in gpu) if gpu else (None, None)
        records.append(
          {
            "shape": "x".join(map(str, shape)),
            "dtype": dtype,
            "pattern": text,
            "mask_us": seconds * 1e6,
            "multiply_us": base * 1e6,
            "ratio": seconds / base,
            "mask_gpu_us": gpu_mask * 1e6 if gpu else None,
            "multiply_gpu_us": gpu_base * 1e6 if gpu else None,
            "gpu_ratio": gpu_mask / gpu_base if gpu else None,
            "correct": correct,
          }
        )
        on_gpu = (
          f"  GPU time: nm_mask {gpu_mask * 1e6:7.1f} us  x*y {gpu_base * 1e6:7.1f} us"
          f"  ratio {gpu_mask / gpu_base:5.2f}"
          if gpu
          else ""
        )
        print(
          f"  {records[-1]['shape']:>10} {dtype:>9} {text:>7}: nm_mask {seconds * 1e6:9.1f} us"
          f"  x*y {base * 1e6:8.1f} us  ratio {seconds / base:5.2f}{on_gpu}"
          f"{'' if correct else '  WRONG'}",
          flush=True,
        )
        if on_record is not None:
          on_record(records)
  return records


def table(records: Sequence[dict], *, gpu: bool = False) -> str:
  """Ratios nm_mask / (x*y), wall time or (``gpu``) GPU kernel time: one row per pattern, one
  column per shape and dtype."""
  ratio, base_key = ("gpu_ratio", "multiply_gpu_us") if gpu else ("ratio", "multiply_us")
  columns = sorted({(r["shape"], r["dtype"]) for r in records}, key=lambda c: (c[1], c[0]))
  patterns = list(dict.fromkeys(r["pattern"] for r in records))
  cell = {(r["shape"], r["dtype"], r["pattern"]): r for r in records}
  header = ["pattern"] + [f"{s} {d}" for s, d in columns]
  rows = [header]
  for p in patterns:
    row = [p]
    for s, d in columns:
      r = cell.get((s, d, p))
      row.append("-" if r is None else f"{r[ratio]:.2f}x" + ("" if r["correct"] else " WRONG"))
    rows.append(row)
  base = ["x*y (us)"] + [
    f"{next(r[base_key] for r in records if (r['shape'], r['dtype']) == c):.1f}" for c in columns
  ]
  rows.append(base)
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="nm_sparse_jax bench masks", description=__doc__)
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--patterns", default=",".join(PATTERNS))
  parser.add_argument("--copies", type=int, default=8)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--json", help="write the records to this file (after each measurement)")
  args = parser.parse_args(argv)
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  device = device_description()
  print(f"nm_mask vs x*y on {device}", flush=True)

  def save(records: list[dict]) -> None:
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"device": device, "records": records}, f, indent=1)

  records = run(
    shapes,
    args.dtypes.split(","),
    args.patterns.split(","),
    copies=args.copies,
    reps=args.reps,
    on_record=save,
  )
  print("\nnm_mask time / x*y time, wall clock (same arrays, groups along axis 0):")
  print(table(records))
  if records and all(r["gpu_ratio"] is not None for r in records):
    print("\nnm_mask time / x*y time, GPU kernel time (profiler):")
    print(table(records, gpu=True))
  save(records)
  return records

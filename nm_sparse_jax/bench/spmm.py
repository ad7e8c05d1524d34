"""N:M sparse matmul on a GPU: dense bf16 vs JAX BCSR (cuSPARSE) vs the Pallas N:M kernel.

For each kernel shape ``KxO`` (a Flax ``Dense`` kernel ``(in, out)``), token count ``T`` and
N:M pattern, ``y = x @ W`` (``x``: ``(T, K)``) is computed by every path side by side:

* ``dense`` -- bfloat16 ``x @ W`` through XLA (the masked weight, stored dense);
* ``bcsr`` -- ``jax.experimental.sparse`` BCSR ``(W^T @ x^T)^T`` in float32, lowered with
  ``jax_bcoo_cusparse_lowering`` on (cuSPARSE on a GPU; the HLO is checked for it);
* ``nm`` -- :func:`nm_sparse_jax.kernels.nm_matmul` on the compressed format (bfloat16 values,
  uint8 in-group index, float32 accumulation, bfloat16 out).

Every result is checked against a float64 NumPy product of the same (bfloat16-representable)
operands. Each timed call runs ``copies`` products on distinct operand copies inside one jitted
executable. Per product, two times:

* **GPU time** -- the kernel durations on the GPU streams in a ``jax.profiler`` trace
  (:mod:`nm_sparse_jax.bench._profile`); the tables use it where the profiler gives it. Before
  every timed call a 256 MB buffer is rewritten (not timed), so that each product reads its
  weights from device memory, as a layer of a model does, even where the compressed copies of
  a call would fit in L2 (32 copies of a 1:32 ViT-L FF kernel: 12 MB; H100 L2: 50 MB).
  ``--warm-l2`` leaves that out (the times of earlier versions of this benchmark);
* **wall time** -- the call's median over rounds that alternate the paths; it includes JAX's
  dispatch, several µs per custom call (Pallas, cuSPARSE), which dominates small products.

The ``nm`` path is timed with each of :func:`~nm_sparse_jax.kernels.candidate_configs` and
reports the fastest (all are in the JSON). The tables give microseconds per product with the
speedup over dense, and time(2:4) / time(N:M) per path (the paper's Table 19). Bounds are
``max(bytes / bandwidth, useful FLOPs / matmul rate)`` with ceilings measured in the same run
(a 1 GiB ``x + 1`` and a bf16 8192^3 matmul).

``--e2e`` adds the paper's Table 8 measure: a ViT forward pass at batch 1 (ViT-L/16 by default,
197 tokens) with N:M feed-forward kernels, dense vs ``nm`` vs ``bcsr``.

    python -m nm_sparse_jax bench spmm [--shapes 1024x4096,4096x1024] [--tokens 1,16,197]
        [--patterns 2:4,1:4,1:8,1:16,1:32,1:128] [--paths dense,bcsr,nm] [--copies 32]
        [--reps 20] [--warm-l2] [--json out.json] [--plot out.png] [--e2e] [--e2e-model vit-l]

On a CPU, ``dense`` and ``bcsr`` run with XLA's CPU lowerings (no cuSPARSE) and the N:M kernel
only in Pallas interpret mode (an emulator: its times say nothing), so the default paths there are
``dense,bcsr``; name ``nm`` to check it anyway.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nm_sparse_jax import finalize, recipes
from nm_sparse_jax import policy as policy_lib
from nm_sparse_jax._masks import nm_mask, parse_nm
from nm_sparse_jax.bench._profile import gpu_kernel_seconds, gpu_kernel_times, l2_flusher
from nm_sparse_jax.bench._timing import device_description, interleaved_medians
from nm_sparse_jax.export import bcsr_from_compressed, compress, export
from nm_sparse_jax.kernels import SpmmConfig, candidate_configs, nm_matmul
from nm_sparse_jax.kernels._backend import available as kernels_available
from nm_sparse_jax.models.vit import VisionTransformer, ViTConfig
from nm_sparse_jax.sparse_linear import bcsr_matmul, cusparse_lowering, jit_apply

PATTERNS = ("2:4", "1:4", "1:8", "1:16", "1:32", "1:128")
SHAPES = ("1024x4096", "4096x1024")  # ViT-L FFN: W1 (in 1024, out 4096) and W2
TOKENS = (1, 16, 197)
PATHS = ("dense", "bcsr", "nm")
E2E_MODELS = {
  "vit-l": ViTConfig(224, 16, 3, 1000, 1024, 24, 16, 4096),
  "vit-b": ViTConfig(224, 16, 3, 1000, 768, 12, 12, 3072),
  "tiny": ViTConfig(16, 4, 3, 10, 64, 1, 2, 256),  # a CPU smoke test
}
# Largest relative error vs the float64 product that passes: bf16 output rounding is ~2e-3.
TOLERANCE = {"dense": 1e-2, "nm": 1e-2, "bcsr": 1e-4}


class Ceilings(dict):
  """Measured device ceilings: ``bandwidth`` (bytes/s, read + write) and ``matmul`` (FLOP/s)."""


def measure_ceilings(reps: int = 10) -> Ceilings | None:
  """Copy bandwidth (1 GiB bf16 ``x + 1``, read + write) and bf16 8192^3 matmul rate; GPU only.

  From GPU kernel time where the profiler gives it, else from wall time.
  """
  if jax.default_backend() != "gpu":
    return None
  x = jnp.ones((1 << 29,), jnp.bfloat16)
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
  add = jax.jit(lambda v: v + jnp.ones((), v.dtype))
  mm = jax.jit(lambda u, v: u @ v)
  fns = [lambda: add(x), lambda: mm(a, b)]
  t_add, t_mm = gpu_kernel_seconds(fns, calls=reps) or interleaved_medians(fns, reps=reps)
  return Ceilings(bandwidth=2 * x.nbytes / t_add, matmul=2 * 8192**3 / t_mm)


def bound_us(path: str, k: int, o: int, t: int, nm, ceilings: Ceilings | None) -> float | None:
  """Lower bound in us for a path: bytes it must move vs useful FLOPs at the bf16 matmul rate."""
  if ceilings is None:
    return None
  if path == "dense":
    nbytes, flops = 2 * k * o + 2 * t * (k + o), 2 * t * k * o
  else:
    nnz = k * o * nm.n // nm.m
    if path == "nm":
      nbytes = 3 * nnz + 2 * t * (k + o)  # bf16 value + uint8 index, bf16 x and y
    else:
      nbytes = 8 * nnz + 4 * (o + 1) + 4 * t * (k + o)  # f32 value + int32 column, f32 x/y
    flops = 2 * t * nnz
  return 1e6 * max(nbytes / ceilings["bandwidth"], flops / ceilings["matmul"])


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def random_nm_weight(key: jax.Array, k: int, o: int, n: int, m: int) -> jax.Array:
  """A ``(k, o)`` bfloat16 weight with exactly ``n`` nonzeros per group of ``m`` along ``k``
  (``n = m`` gives a dense weight)."""
  w = jax.random.normal(key, (k, o), jnp.float32).astype(jnp.bfloat16)
  if n == m:
    return w
  return jnp.where(nm_mask(w, n, m, axis=0), w, jnp.zeros((), w.dtype))


_compress = jax.jit(compress, static_argnames=("n", "m", "axis", "dtype"))


def _path_fn(path: str, config: SpmmConfig | None) -> Callable[[jax.Array, Any], jax.Array]:
  if path == "dense":
    return lambda x, w: x @ w
  if path == "bcsr":
    return bcsr_matmul
  return functools.partial(nm_matmul, config=config)


def _operands(path: str, w_dense: jax.Array, nm) -> Any:
  if path == "dense":
    return w_dense
  c = _compress(w_dense, n=nm.n, m=nm.m, axis=0)
  return c if path == "nm" else bcsr_from_compressed(c, dtype=jnp.float32)


def compile_batched(path: str, xs: list, ws: list, config: SpmmConfig | None = None):
  """AOT-compiles ``[f(x, w) for x, w in zip(xs, ws)]``; BCSR inside :func:`cusparse_lowering`.

  Returns ``(run, hlo_has_cusparse)``, ``run`` a zero-argument callable.
  """
  fn = _path_fn(path, config)
  jitted = jax.jit(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)])
  if path == "bcsr":
    with cusparse_lowering():
      compiled = jitted.lower(xs, ws).compile()
  else:
    compiled = jitted.lower(xs, ws).compile()
  return functools.partial(compiled, xs, ws), "cusparse" in compiled.as_text().lower()


def relative_error(y: jax.Array, ref: np.ndarray) -> float:
  y = np.asarray(y.astype(jnp.float32), np.float64)
  return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def _x(key: jax.Array, t: int, k: int) -> jax.Array:
  return jax.random.normal(key, (t, k), jnp.float32).astype(jnp.bfloat16)


def run_case(
  k: int,
  o: int,
  t: int,
  patterns: Sequence[str],
  paths: Sequence[str],
  *,
  copies: int,
  reps: int,
  ceilings: Ceilings | None,
  configs: Sequence[SpmmConfig] | None = None,
  flush: Callable[[], object] | None = None,
) -> list[dict]:
  """One shape and token count: every path and pattern, checked, then timed interleaved.

  The ``nm`` path is timed with each of ``configs`` (default
  :func:`~nm_sparse_jax.kernels.candidate_configs` of the pattern); its record is the fastest
  correct one, with every candidate's time under ``"candidates"``. ``flush`` (e.g.
  :func:`~nm_sparse_jax.bench._profile.l2_flusher`) runs before every call of the GPU timing.
  """
  keys = jax.random.split(jax.random.key(k * 131 + o * 7 + t), 2 * copies)
  xs = [_x(kk, t, k) for kk in keys[:copies]]
  x_ref = np.asarray(xs[0].astype(jnp.float32), np.float64)
  candidates = []  # (record, run)
  failures = []

  def add(path, text, xs_path, ws, ref, config=None):
    run, cusparse = compile_batched(path, xs_path, ws, config)
    record = _record(k, o, t, path, text, relative_error(run()[0], ref), cusparse, copies)
    record["config"] = list(config) if config is not None else None
    candidates.append((record, run))

  if "dense" in paths:
    ws = [random_nm_weight(kk, k, o, 1, 1) for kk in keys[copies:]]
    add("dense", "dense", xs, ws, x_ref @ np.asarray(ws[0].astype(jnp.float32), np.float64))
  for text in patterns if set(paths) - {"dense"} else ():
    nm = parse_nm(text)
    ws_dense = [random_nm_weight(kk, k, o, *nm) for kk in keys[copies:]]
    ref = x_ref @ np.asarray(ws_dense[0].astype(jnp.float32), np.float64)
    if "bcsr" in paths:
      # cuSPARSE computes in float32: the BCSR path gets float32 activations (same values).
      ws = [_operands("bcsr", w, nm) for w in ws_dense]
      add("bcsr", text, [x.astype(jnp.float32) for x in xs], ws, ref)
    if "nm" in paths:
      ws = [_operands("nm", w, nm) for w in ws_dense]
      for config in configs or candidate_configs(t, o, nm.n / nm.m, k):
        try:
          add("nm", text, xs, ws, ref, config)
        except Exception as e:  # a configuration the compiler rejects is reported, not fatal
          failures.append({"pattern": text, "config": list(config), "error": f"{e!r}"[:300]})
          print(f"  nm {text} {config}: failed: {e!r}"[:300], flush=True)
    del ws_dense, ws
  runs = [run for _, run in candidates]
  wall = interleaved_medians(runs, reps=reps)
  kernels = gpu_kernel_times(runs, calls=5, flush=flush)
  if kernels is None and jax.default_backend() == "gpu":
    print(f"  {k}x{o} T={t}: the profiler trace did not split into the candidates: wall time")
  for i, (record, _) in enumerate(candidates):
    record["wall_us"] = wall[i] / copies * 1e6
    # Where the GPU time goes: each kernel's share per product (e.g. an XLA reduction of split-K
    # partial sums, or the transpose of x before "gather_t"); their sum is the GPU time.
    split = {name: s / copies * 1e6 for name, s in kernels[i].items()} if kernels else None
    record["gpu_kernels_us"] = split
    record["gpu_us"] = sum(split.values()) if kernels else None
    record["timer"] = "gpu" if kernels else "wall"
    record["us"] = record["gpu_us"] if kernels else record["wall_us"]
    nm = None if record["path"] == "dense" else parse_nm(record["pattern"])
    record["bound_us"] = bound_us(record["path"], k, o, t, nm, ceilings)
  records = _best_nm(record for record, _ in candidates)
  for r in records:
    if r["path"] == "nm":
      r["failed_configs"] = [f for f in failures if f["pattern"] == r["pattern"]]
  dense = next((r for r in records if r["path"] == "dense"), None)
  for r in records:
    two_four = next((q for q in records if q["path"] == r["path"] and q["pattern"] == "2:4"), None)
    for key, prefix in (("us", ""), ("wall_us", "wall_")):
      r[f"{prefix}speedup_vs_dense"] = dense[key] / r[key] if dense else None
      r[f"{prefix}speedup_vs_2_4"] = (
        two_four[key] / r[key] if two_four and r["path"] != "dense" else None
      )
  return records


def _best_nm(records) -> list[dict]:
  """One ``nm`` record per pattern: the fastest correct configuration (all listed in it)."""
  out, nm_groups = [], {}
  for r in records:
    if r["path"] == "nm":
      nm_groups.setdefault(r["pattern"], []).append(r)
    else:
      out.append(r)
  for group in nm_groups.values():
    best = min(group, key=lambda r: (not r["ok"], r["us"]))
    keys = ("config", "us", "wall_us", "gpu_us", "gpu_kernels_us", "relerr")
    best = dict(best, candidates=[{key: r[key] for key in keys} for r in group])
    out.append(best)
  return out


def _record(k, o, t, path, pattern, err, cusparse, copies) -> dict:
  return {
    "shape": f"{k}x{o}",
    "tokens": t,
    "path": path,
    "pattern": pattern,
    "relerr": err,
    "ok": bool(err <= TOLERANCE[path]),
    "cusparse_in_hlo": cusparse if path == "bcsr" else None,
    "copies": copies,
  }


def _fmt(v: float | None, spec: str = ".1f") -> str:
  return "-" if v is None else format(v, spec)


def table(records: Sequence[dict], key: str = "us") -> str:
  """µs per product (speedup vs dense) and time(2:4)/time(N:M), one row per shape, T and path.

  ``key`` is ``"us"`` (GPU kernel time where measured, else wall) or ``"wall_us"``. Where some
  cases have GPU time and others only wall time (a profiler trace that did not split into the
  candidates), the wall-time rows say so.
  """
  prefix = "wall_" if key == "wall_us" else ""
  timers = {"wall"} if key == "wall_us" else {r["timer"] for r in records} or {"wall"}
  patterns = list(dict.fromkeys(r["pattern"] for r in records if r["path"] != "dense"))
  lines = []
  cases = list(dict.fromkeys((r["shape"], r["tokens"]) for r in records))
  rows = [["shape", "T", "path", "dense us"] + patterns]
  ratio_rows = [["shape", "T", "path"] + patterns]
  for shape, t in cases:
    case = [r for r in records if (r["shape"], r["tokens"]) == (shape, t)]
    dense = next((r for r in case if r["path"] == "dense"), None)
    for path in dict.fromkeys(r["path"] for r in case if r["path"] != "dense"):
      cells = {r["pattern"]: r for r in case if r["path"] == path}
      wall_row = len(timers) > 1 and case[0]["timer"] == "wall"
      row = [shape, str(t), path + " (wall)" * wall_row, _fmt(dense and dense[key])]
      ratio = [shape, str(t), path]
      for p in patterns:
        r = cells.get(p)
        if r is None:
          row.append("-")
          ratio.append("-")
          continue
        speedup = r[f"{prefix}speedup_vs_dense"]
        row.append(
          f"{r[key]:.1f}"
          + (f" ({speedup:.2f}x)" if speedup else "")
          + ("" if r["ok"] else " WRONG")
        )
        ratio.append(_fmt(r[f"{prefix}speedup_vs_2_4"], ".2f"))
      rows.append(row)
      ratio_rows.append(ratio)
  what = "GPU kernel time" if "gpu" in timers else "wall time (dispatch included)"
  if len(timers) > 1:
    what += " (rows marked (wall): wall time, dispatch included)"
  for block, title in (
    (rows, f"{what}, us per product (speedup vs dense bf16)"),
    (ratio_rows, f"{what}: time(2:4) / time(N:M) (Table 19 form)"),
  ):
    widths = [max(len(r[i]) for r in block) for i in range(len(block[0]))]
    lines.append(title + ":")
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in block]
    lines.append("")
  return "\n".join(lines)


def plot(records: Sequence[dict], path: str) -> bool:
  """Speedup vs dense per pattern, one line per (shape, T, path); False without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  patterns = list(dict.fromkeys(r["pattern"] for r in records if r["path"] != "dense"))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key in dict.fromkeys((r["shape"], r["tokens"], r["path"]) for r in records):
    if key[2] == "dense":
      continue
    cells = {
      r["pattern"]: r["speedup_vs_dense"]
      for r in records
      if (r["shape"], r["tokens"], r["path"]) == key
    }
    ys = [cells.get(p) for p in patterns]
    ax.plot(
      patterns,
      ys,
      marker="o",
      linestyle="-" if key[2] == "nm" else "--",
      label=f"{key[2]} {key[0]} T={key[1]}",
    )
  ax.axhline(1.0, color="gray", linewidth=0.8)
  ax.set_yscale("log")
  ax.set_xlabel("N:M pattern")
  ax.set_ylabel("speedup vs dense bf16")
  ax.set_title(device_description(), fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _random_params(model: VisionTransformer, images: jax.Array, dtype) -> Any:
  """Random normal parameters (std 0.02) of ``model``: one small jitted draw per leaf shape.

  (One draw of all the weights sliced into leaves compiles for minutes on a GPU for ViT-L.)
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  draw = jax.jit(
    lambda key, shape: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
    static_argnums=1,
  )
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [draw(k, s.shape) for k, s in zip(keys, leaves)])


def end_to_end(
  model_name: str,
  patterns: Sequence[str],
  paths: Sequence[str],
  *,
  reps: int,
  bcsr_patterns: Sequence[str] | None = None,
) -> list[dict]:
  """Forward pass at batch 1 with N:M FF kernels: dense bf16 vs each sparse path and pattern.

  The ``nm`` path runs ``patterns``; ``bcsr`` runs ``bcsr_patterns`` (default the same). Every
  sparse output is compared with the dense model on the same masked weights.
  """
  config = E2E_MODELS[model_name]
  model = VisionTransformer(config)
  images = jax.random.normal(
    jax.random.key(2), (1, config.image_size, config.image_size, config.channels)
  ).astype(jnp.bfloat16)
  params = _random_params(model, images, jnp.bfloat16)
  dense_fn = jit_apply(model)
  candidates = [("dense", "dense", dense_fn, {"params": params}, None)]
  wanted = {"nm": tuple(patterns), "bcsr": tuple(bcsr_patterns or patterns)}
  for text in dict.fromkeys(wanted["nm"] + wanted["bcsr"]):
    pol = policy_lib.vit(recipes.ste(), ff=text)
    hard = finalize(params, pol)
    reference = dense_fn({"params": hard}, images)
    for path in paths:
      if path == "dense" or text not in wanted[path]:
        continue
      exported = export(hard, pol, format=path, dtype=jnp.bfloat16 if path == "nm" else jnp.float32)
      candidates.append((path, text, jit_apply(model), {"params": exported}, reference))
  runs, records = [], []
  for path, text, fn, variables, reference in candidates:
    out = fn(variables, images)
    err = None
    if reference is not None:
      ref = np.asarray(reference.astype(jnp.float32), np.float64)
      err = relative_error(out, ref)
    runs.append(functools.partial(fn, variables, images))
    records.append(
      {
        "model": model_name,
        "tokens": config.tokens,
        "path": path,
        "pattern": text,
        "relerr_vs_dense_masked": err,
      }
    )
  seconds = interleaved_medians(runs, reps=reps)
  gpu = gpu_kernel_seconds(runs, calls=3, gap_s=0.05)  # host work between forward calls
  for i, r in enumerate(records):
    r["ms"] = seconds[i] * 1e3
    r["speedup_vs_dense"] = seconds[0] / seconds[i]
    r["gpu_ms"] = gpu[i] * 1e3 if gpu else None
    r["gpu_speedup_vs_dense"] = gpu[0] / gpu[i] if gpu else None
  return records


def e2e_table(records: Sequence[dict]) -> str:
  """ms per forward (wall, and GPU kernel time where measured) and the speedups over dense."""
  lines = [
    f"{'path':>6} {'pattern':>8} {'wall ms':>9} {'vs dense':>9} {'GPU ms':>8} {'vs dense':>9}"
    f" {'relerr':>8}"
  ]
  for r in records:
    err = "-" if r["relerr_vs_dense_masked"] is None else f"{r['relerr_vs_dense_masked']:.1e}"
    gpu = (
      f"{r['gpu_ms']:8.3f} {r['gpu_speedup_vs_dense']:8.2f}x"
      if r["gpu_ms"]
      else f"{'-':>8} {'-':>9}"
    )
    wall = f"{r['ms']:9.3f} {r['speedup_vs_dense']:8.2f}x"
    lines.append(f"{r['path']:>6} {r['pattern']:>8} {wall} {gpu} {err:>8}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(
    prog="nm_sparse_jax bench spmm",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  gpu = jax.default_backend() == "gpu"
  parser.add_argument("--shapes", default=",".join(SHAPES), help="KxO kernel shapes (in x out)")
  parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
  parser.add_argument("--patterns", default=",".join(PATTERNS))
  default_paths = [p for p in PATHS if p != "nm" or (gpu and kernels_available())]
  parser.add_argument("--paths", default=",".join(default_paths))
  parser.add_argument("--copies", type=int, default=32, help="distinct operand copies per call")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument(
    "--warm-l2", action="store_true", help="no L2 flush before the timed calls (GPU time)"
  )
  parser.add_argument("--json", help="write every record to this file (after each case)")
  parser.add_argument("--plot", help="write a PNG of the speedups (needs matplotlib)")
  parser.add_argument("--no-kernels", action="store_true", help="skip the per-matmul table")
  parser.add_argument("--e2e", action="store_true", help="also time a ViT forward at batch 1")
  parser.add_argument("--e2e-model", default="vit-l" if gpu else "tiny", choices=tuple(E2E_MODELS))
  parser.add_argument("--e2e-patterns", default="2:4,1:4,1:8,1:16,1:32")
  parser.add_argument("--e2e-bcsr-patterns", help="patterns of the bcsr path (default: the same)")
  args = parser.parse_args(argv)
  paths = [p for p in args.paths.split(",") if p]
  unknown = set(paths) - set(PATHS)
  if unknown:
    parser.error(f"--paths: unknown {sorted(unknown)}; choose from {', '.join(PATHS)}")
  if "nm" in paths and not kernels_available():
    parser.error(
      f"--paths nm: the N:M kernels need Pallas's Triton backend, which JAX {jax.__version__} "
      "does not provide"
    )
  device = device_description()
  print(f"bench spmm on {device}", flush=True)
  if gpu and not kernels_available():
    print("  this JAX lacks Pallas's Triton backend: no nm path", flush=True)
  if not gpu:
    print(
      "  no GPU: dense and bcsr use XLA's CPU lowerings (no cuSPARSE); the N:M kernel runs only "
      "in Pallas interpret mode (times meaningless); no bounds",
      flush=True,
    )
  ceilings = measure_ceilings()
  if ceilings:
    print(
      f"  ceilings: copy {ceilings['bandwidth'] / 1e12:.3f} TB/s (read+write), bf16 matmul "
      f"{ceilings['matmul'] / 1e12:.0f} TFLOP/s",
      flush=True,
    )
  flush = l2_flusher() if gpu and not args.warm_l2 else None
  result = {
    "device": device,
    "ceilings": ceilings,
    "l2": "flushed before every timed call" if flush else "not flushed",
    "records": [],
    "e2e": [],
  }

  def save() -> None:
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1)

  if not args.no_kernels:
    for shape in args.shapes.split(","):
      k, o = (int(v) for v in shape.split("x"))
      for t in (int(v) for v in args.tokens.split(",")):
        start = time.perf_counter()
        recs = run_case(
          k,
          o,
          t,
          args.patterns.split(","),
          paths,
          copies=args.copies,
          reps=args.reps,
          ceilings=ceilings,
          flush=flush,
        )
        result["records"] += recs
        print(
          f"  {shape} T={t}: {len(recs)} timings in {time.perf_counter() - start:.0f} s", flush=True
        )
        save()  # after every case, so that a run cut short keeps what it measured
    print()
    print(table(result["records"]))
    if any(r["timer"] == "gpu" for r in result["records"]):
      print(table(result["records"], "wall_us"))
  if args.e2e:
    result["e2e"] = end_to_end(
      args.e2e_model,
      args.e2e_patterns.split(","),
      paths,
      reps=args.reps,
      bcsr_patterns=args.e2e_bcsr_patterns.split(",") if args.e2e_bcsr_patterns else None,
    )
    print(f"end to end: {args.e2e_model} forward, batch 1, N:M FF kernels (Table 8 form):")
    print(e2e_table(result["e2e"]))
  save()
  if args.plot and result["records"] and not plot(result["records"], args.plot):
    print("  --plot: matplotlib is not installed; no plot written")
  return result

"""``y = x @ W`` for an N:M kernel ``W`` in the compressed format, as Pallas (Triton) kernels.

With ``C = K*n/m`` kept weights per output and ``k(o, c) = (c // n)*m + index[o, c]``:

    y[t, o] = sum_c values[o, c] * x[t, k(o, c)]

Five kernels compute it, all reading only the compressed weight (``C*(2 + 1)`` bytes per output
for bfloat16 values) and accumulating in float32:

* ``"gather"`` (few tokens): each program owns ``block_out`` outputs and ``block_t`` tokens (all
  of them, or one per program for very sparse patterns); it walks the compressed columns
  ``block_k`` at a time, gathers ``x[t, k(o, c)]`` (``x`` is small and stays in L1/L2) and
  multiply-adds on the CUDA cores: ``T*O*C`` FMAs, no wasted work. The weights, read once, are
  loaded with an evict-first hint so that they do not push ``x`` out of L1. With
  ``outputs_on_lanes`` the lanes of a warp take different outputs at one compressed column, so
  that one gather reads the inputs of one group instead of one group per lane (H100: 1:32 at 4
  to 16 tokens 1.4x-1.8x faster, 1:128 at 197 tokens 2x; from 1:4 down). With ``flat`` (one
  token per program) the products stay a two-dimensional tile in the layout the weights were
  loaded in (H100: one-token 2:4 on wide outputs 1.03x-1.4x faster, 1:128 at 1 to 64 tokens
  1.06x-1.4x).
* ``"select"`` (one token, dense patterns): the same, but without a load that waits on the
  index: each step loads the ``m`` inputs of each of its groups along with the values and
  indices, and picks each kept weight's input with a select chain over the ``m`` positions
  (``m`` selects per kept weight instead of one dependent load).
* ``"gather_t"`` (tens to hundreds of tokens, very sparse): the same gather-FMA on ``x^T``
  (``(K, T)``, transposed and padded by XLA), ``block_t`` tokens per program, so that the tokens
  of one gathered input are one contiguous vector load; ``T*O*C`` FMAs, optionally split along
  ``C``. It wins where each output has few kept weights (1:128, and 1:32 on narrow outputs, at 16
  tokens).
* ``"dot"`` (16 tokens and more): each program owns ``block_out`` outputs and ``block_t``
  tokens; it expands a ``(block_out, block_k)`` tile of ``W^T`` from (values, index) in
  registers -- ``Wt[o, g*m + j] = sum_s values[o, g*n+s] * (index[o, g*n+s] == j)``, as a
  select chain in the values' dtype -- and multiplies it with the ``x`` tile on the tensor cores:
  ``acc^T = Wt @ x^T`` (the outputs fill the matrix unit's M dimension, up to 32 tokens) or,
  with ``tokens_in_m``, ``acc = x @ Wt^T`` (the tokens fill M; the default above 32 tokens,
  up to 1.3x faster at 197 tokens on an H100). It does the dense FLOPs but moves only the
  compressed bytes. With ``split_k > 1`` the ``K`` loop is split over programs (float32
  partial sums, added by XLA).
* ``"dot_gather"``: the same, with the tile built straight in two dimensions from
  repeated-address loads (each position of a group loads that group's kept values and indices)
  instead of a broadcast and reshape; faster on narrow outputs and dense patterns at 16 tokens.

Backend: Pallas's Triton lowering, because the few-token kernel is a per-lane gather
(``x[t, k(o, c)]`` with a different ``k`` in every lane), which Triton expresses directly and
Mosaic GPU (warpgroup-level arrays, TMA tiles) does not; measured on an H100 it runs a one-token
ViT-L FFN product in 1.8-3.5 µs of GPU time at 1:8 and sparser, against 7.5-17 µs for XLA's
dense bfloat16 (BENCHMARKS.md).

On a CPU the kernels run in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nm_sparse_jax.export._compressed import NMCompressed
from nm_sparse_jax.kernels._backend import pl, plgpu, require

__all__ = [
  "SpmmConfig",
  "candidate_configs",
  "default_config",
  "nm_matmul",
  "nm_matmul_reference",
]

VARIANTS = ("gather", "select", "gather_t", "dot", "dot_gather")


class SpmmConfig(NamedTuple):
  """Block sizes and launch parameters of an N:M matmul kernel (all powers of two).

  Attributes:
    variant: "gather" (CUDA-core gather-FMA), "select" (the same, inputs picked by a select
      chain), "gather_t" (the gather on token-minor ``x^T``, tokens tiled over programs), "dot"
      (expand a tile, tensor-core dot) or "dot_gather" (the same with the tile built from
      repeated-address loads).
    block_out: outputs per program.
    block_k: "gather", "select", "gather_t": compressed columns per step ("select": a
      multiple of ``n``); "dot", "dot_gather": dense inputs per step.
    block_t: tokens per program ("select" takes all tokens; for "gather" a value at least the
      token count means all of them in one program).
    num_warps: warps per program.
    num_stages: software-pipelining depth of the loop over ``K``.
    split_k: "gather_t", "dot", "dot_gather": programs along ``K`` (float32 partial sums,
      added by XLA), for more parallelism when ``O`` is small and ``K`` large.
    tokens_in_m: "dot", "dot_gather": the tokens fill the matrix unit's ``M`` dimension
      (``acc = x @ Wt^T``, the ``x`` tile the left operand) instead of the outputs
      (``acc^T = Wt @ x^T``); ignored by the gather kernels.
    outputs_on_lanes: "gather": the products tile is ``(block_t, block_k, block_out)``, the
      outputs minor, so that the lanes of a warp hold different outputs at the same compressed
      column and one gather reads the inputs of one or two groups (a few 128-byte lines) instead
      of one group per lane; ``block_k`` is then capped by the row instead of dividing it (the
      last step masked); ignored by the other kernels.
    flat: "gather" with one token per program (``block_t = 1``, outputs not on the lanes):
      gather ``x`` with the ``(block_out, block_k)`` tile of indices itself, without a token
      axis, so that the products keep the layout in which the weights were loaded (no
      conversion through shared memory); ignored by the other kernels.
  """

  variant: str = "gather"
  block_out: int = 16
  block_k: int = 64
  block_t: int = 64
  num_warps: int = 4
  num_stages: int = 2
  split_k: int = 1
  tokens_in_m: bool = False
  outputs_on_lanes: bool = False
  flat: bool = False


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pow2_at_least(v: int) -> int:
  return 1 << max(v - 1, 0).bit_length()


def _pow2_dividing(v: int, cap: int) -> int:
  """The largest power of two that divides ``v``, at most ``cap``."""
  return min(v & -v, cap)


def _dot_configs(tokens: int, out_features: int, density: float | None) -> tuple[SpmmConfig, ...]:
  """Tensor-core candidates, split along ``K`` until enough programs run:

  * up to 32 tokens (one token tile): ``"dot"`` with 32 outputs x 256 inputs per step (~512
    programs, split up to 4 ways) and ``"dot_gather"`` with 16 outputs x 256 inputs
    (``O >= 2048``) or 128 (~512 programs, split up to 8 ways); ``"dot_gather"`` first for
    ``O < 2048`` or ``density >= 1/2``. The outputs fill the matrix unit's ``M`` dimension,
    except for ``O < 2048`` and ``density < 1/4``: there ``"dot"`` with the tokens in ``M``, 32
    outputs x 128 inputs split up to 8 ways, comes first (H100, W2 at 16 tokens, two sweeps:
    1:8 6.5 vs 6.7 µs for ``"dot_gather"``, 1:16 5.9 vs 6.3). For ``O >= 2048`` with at most
    16 tokens and ``density <= 1/4``, an unsplit ``"dot"`` comes first, so that no XLA kernel
    adds the split's partial sums (~1.4 µs on an H100): 32 outputs x 256 inputs (4 warps) up
    to density 1/16, else 16 x 256 (2 warps below 1/4; 4 warps and 2 stages at 1/4). H100,
    W1 at 16 tokens, µs of GPU time against the previous default: 1:32 4.5-4.6 vs 4.8-4.9
    (``"gather_t"``), 1:16 4.4-4.5 vs 5.4-5.5, 1:8 5.4 vs 5.8, 1:4 6.2-6.3 vs 6.7;
  * more tokens: ``"dot"`` with the tokens in ``M`` (``tokens_in_m``), ~128 programs.
    ``O >= 2048``: 64 outputs x 128 tokens x 128 inputs per step below ``density`` 1/4, else
    32 x 256 x 128 (8 warps); ``O < 2048``: 64 x 128 x 128 split 4 ways (8 warps, 4 stages)
    below 1/16, else 64 x 256 x 64 split 8 ways (4 warps below 1/4, else 8). Then the other
    tiling, then the outputs-in-``M`` one (32 x 256 x 128 for ``O >= 2048``, else 64 x 256 x
    64 split 8 ways; 8 warps), which comes first for ``density >= 1/2`` (2:4, H100: W1 17.1
    vs 17.3 µs, W2 17.6 vs 18.3).

  Measured side by side (BENCHMARKS.md), ViT-L FFN shapes, µs of GPU time: 16 tokens, 1:8, W1
  ``"dot"`` 5.7 vs 7.2 for the previous 64 x 128 tiles, W2 ``"dot_gather"`` 6.6 vs 11.9, 2:4
  9.5 vs 27.2 (H200); 197 tokens, tokens in ``M`` against outputs in ``M`` (H100): W1 1:16
  10.7 vs 12.7, 1:32 10.0 vs 13.4; W2 1:16 13.2 vs 14.3, 1:32 12.0 vs 14.3; W2 with 4 warps
  instead of 8: 1:16 12.8 vs 13.2, 1:8 13.4 vs 14.3, but 1:4 15.8 vs 14.5.
  """
  wide = out_features >= 2048

  def split(block_out: int, block_t: int, target: int, cap: int) -> int:
    programs = max(out_features // block_out, 1) * _cdiv(tokens, block_t)
    return 1 if programs >= target else min(cap, _pow2_at_least(target // programs))

  block_t = min(_pow2_at_least(tokens), 256)
  if tokens <= 32:
    dot = SpmmConfig("dot", 32, 256, block_t, 4, 3, split(32, block_t, 512, 4))
    gathered = SpmmConfig(
      "dot_gather", 16, 256 if wide else 128, block_t, 4, 3, split(16, block_t, 512, 8)
    )
    dense_ish = density is not None and density >= 0.5
    if wide and tokens <= 16 and density is not None and density <= 1 / 4:
      if density <= 1 / 16:
        unsplit = SpmmConfig("dot", 32, 256, block_t, 4, 3)
      else:
        unsplit = SpmmConfig("dot", 16, 256, block_t, *((2, 3) if density < 1 / 4 else (4, 2)))
      return unsplit, dot, gathered
    if wide or density is None or density >= 1 / 4:
      return (dot, gathered) if wide and not dense_ish else (gathered, dot)
    tokens_first = SpmmConfig("dot", 32, 128, block_t, 4, 3, split(32, block_t, 512, 8), True)
    return tokens_first, gathered, dot
  half_t = min(block_t, 128)
  if wide:
    sparse = density is None or density < 1 / 4
    half = SpmmConfig("dot", 64, 128, half_t, 8, 3, split(64, half_t, 128, 4), True)
    full = SpmmConfig("dot", 32, 128, block_t, 8, 3, split(32, block_t, 128, 4), True)
  else:
    sparse = density is None or density < 1 / 16
    half = SpmmConfig("dot", 64, 128, half_t, 8, 4, split(64, half_t, 128, 4), True)
    warps = 8 if density is not None and density >= 1 / 4 else 4
    full = SpmmConfig("dot", 64, 64, block_t, warps, 3, split(64, block_t, 128, 8), True)
  outputs_in_m = full._replace(tokens_in_m=False, num_warps=8)
  if density is not None and density >= 1 / 2:
    return outputs_in_m, full, half
  return ((half, full) if sparse else (full, half)) + (outputs_in_m,)


def _gather_t_configs(
  tokens: int, out_features: int, density: float | None = None
) -> tuple[SpmmConfig, ...]:
  """``"gather_t"``: up to 32 tokens per program, ~4K products per step with 4 warps (16 outputs
  for ``O >= 2048``, else 8), then split along ``K`` (2 ways for ``O >= 2048``, else 4), then
  ~8K products with 8 warps. Up to 16 tokens the order differs:

  * ``O >= 2048``: the 8-warp tiling first (H100, W1 at 16 tokens, 1:128, µs of GPU time,
    three runs: 3.0 vs 3.2, 3.2 vs 3.2, 3.1 vs 3.4);
  * ``O < 2048``: ~8K products with 8 warps (8 outputs), but for ``density > 1/64`` first 4
    outputs with ~2K products and 4 warps (W2 at 16 tokens, 1:32: 4.7 vs 5.5 and 5.1 vs 5.5;
    at 1:128 3.6 vs 3.6 and 3.8 vs 3.5), then its split.

  At 197 tokens 8 warps lose (H200, 1:128: 14.6 vs 11.3 µs).
  """
  block_t = min(_pow2_at_least(tokens), 32)
  wide = out_features >= 2048

  def tiling(block_out: int, products: int, warps: int) -> SpmmConfig:
    block_k = max(products // (block_out * block_t), 1)
    return SpmmConfig("gather_t", block_out, block_k, block_t, warps, 2)

  four_warps = tiling(16 if wide else 8, 4096, 4)
  eight_warps = tiling(16 if wide else 8, 8192, 8)
  if block_t > 16:
    return four_warps, four_warps._replace(split_k=2 if wide else 4), eight_warps
  if wide:
    return eight_warps, four_warps, four_warps._replace(split_k=2)
  few_outputs = tiling(4, 2048, 4)
  first, second = (eight_warps, few_outputs)
  if density is not None and density > 1 / 64:
    first, second = second, first
  return first, second, eight_warps._replace(split_k=4)


def _whole_rows(out_features: int, per_row: int, products: int, warps: int) -> SpmmConfig:
  """``"gather"`` with one token per program and whole rows: all ``C = per_row`` compressed
  columns (in steps of at most 1024) of ``products // C`` outputs (a power of two, 1 to ``O``)."""
  block_k = min(_pow2_at_least(per_row), 1024)
  block_out = max(min(products // min(per_row, block_k), out_features), 1)
  return SpmmConfig("gather", 1 << (block_out.bit_length() - 1), block_k, 1, warps)


def _rows_first(tokens: int, out_features: int, per_row: int) -> bool:
  """Whether the whole-row ``"gather"`` (:func:`_whole_rows`, ``density <= 1/32``) leads: from 3
  tokens (``O >= 2048``) or 4 (narrower) up to 8, and up to 16 while a call has at most 2^20
  products ``T*O*C`` (H100, 16 tokens, µs with the weights from device memory: ViT-L W1 1:128
  2.9 vs 3.7 and T5 768x2048 1:32 2.9 vs 4.1 led; ViT-L 1:32, 2^21 products, lost: W1 5.6 vs 5.0
  for the unsplit ``"dot"``)."""
  if tokens < (3 if out_features >= 2048 else 4) or tokens > 16:
    return False
  return tokens <= 8 or tokens * out_features * per_row <= 1 << 20


def _lead_few_tokens(
  configs: tuple[SpmmConfig, ...], wide: bool, density: float | None, rows: bool = False
) -> tuple[SpmmConfig, ...]:
  """5 to 8 tokens: ``configs`` with the one measured fastest first (H100, 8 tokens, µs of GPU
  time against the first candidate of the 16-token rules): for ``O >= 2048`` the split
  ``"dot"`` (32 outputs x 256 inputs) down to density 1/8 (2:4 8.7 vs 19.4, 1:8 5.8 vs 6.0),
  ``"gather"`` with 8 outputs x 128 columns down to 1/32 (1:32 4.2 vs 5.2), else
  ``"gather_t"``; for ``O < 2048`` the split ``"dot"`` down to 1/4 (2:4 12.5 vs 20.8), the
  tokens-in-``M`` ``"dot"`` down to 1/8, ``"gather"`` with 2-token programs at 1/16 (W2 1:16
  4.7 vs 5.4 for the ``"dot"`` in three runs, 4.9 vs 5.8 with the weights read from device
  memory), else ``"gather_t"``. With ``rows`` the whole-row ``"gather"`` leads
  (:func:`_rows_first`; weights from device memory: W1 1:32 3.9 vs 4.7 for ``"gather"`` 4 x 256,
  1:128 2.6 vs 3.5 for ``"gather_t"``; W2 1:32 4.8 vs 5.4, 1:128 3.1 vs 3.7)."""
  d = 1.0 if density is None else density
  if rows:
    want = "rows"
  elif wide:
    want = "split dot" if d >= 1 / 8 else "gather" if d >= 1 / 32 else "gather_t"
  elif d >= 1 / 4:
    want = "split dot"
  else:
    want = "tokens in M" if d >= 1 / 8 else "token pairs" if d >= 1 / 16 else "gather_t"

  def matches(c: SpmmConfig) -> bool:
    if want == "split dot":
      return c.variant == "dot" and (c.block_out, c.block_k) == (32, 256) and c.split_k > 1
    if want == "tokens in M":
      return c.variant == "dot" and c.tokens_in_m
    if want in ("rows", "token pairs"):
      return c.variant == "gather" and c.block_t == (1 if want == "rows" else 2)
    return c.variant == want

  first = next((c for c in configs if matches(c)), configs[0])
  return (first, *(c for c in configs if c != first))


# "gather" with the outputs on the lanes, where it led (H100, ViT-L FFN shapes, weights from
# device memory): by the density class (n/m at most 1/4 ... 1/64) and output width (O >= 2048),
# rows of (most tokens, block_out, block_k, block_t, num_warps), block_k capped by the row.
_LANES = {
  (1 / 4, False): ((2, 2, 1024, 1, 4), (8, 4, 256, 2, 4)),
  (1 / 4, True): ((1, 4, 256, 1, 8), (4, 4, 256, 2, 4)),
  (1 / 8, False): ((2, 4, 512, 1, 8), (8, 4, 256, 2, 4)),
  (1 / 8, True): ((1, 8, 128, 1, 4), (2, 4, 128, 2, 4), (8, 8, 128, 2, 4)),
  (1 / 16, False): ((4, 4, 256, 1, 4), (8, 4, 256, 2, 4), (16, 16, 128, 2, 4)),
  (1 / 16, True): ((1, 8, 64, 1, 4), (4, 8, 64, 2, 4), (16, 16, 64, 2, 4)),
  (1 / 32, False): (
    (4, 8, 128, 1, 4),
    (8, 16, 128, 1, 8),
    (16, 16, 128, 2, 8),
    (32, 16, 128, 2, 4),
  ),
  (1 / 32, True): ((4, 16, 32, 1, 4), (8, 32, 32, 1, 4), (16, 32, 32, 2, 4), (32, 64, 32, 2, 8)),
  (1 / 64, False): ((16, 32, 32, 1, 8), (32, 64, 32, 1, 8), (256, 128, 32, 2, 8)),
  (1 / 64, True): ((8, 32, 8, 1, 4), (16, 32, 8, 2, 4), (32, 64, 8, 2, 8), (256, 256, 8, 2, 8)),
}


def _lanes_config(tokens: int, out_features: int, density: float | None) -> SpmmConfig | None:
  """The ``"gather"`` kernel with ``outputs_on_lanes`` where it was measured fastest, else None:
  from density 1/4 (``O < 2048``: up to 8 tokens; wider: up to 4), 1/8 (up to 8 tokens), 1/16
  (up to 16), 1/32 (up to 32) and 1/64 and sparser (up to 256 tokens), with the tiling of
  ``_LANES``. Few outputs per program (2 to 32; up to 256 for very sparse patterns at many
  tokens), whole rows or long steps, one or two tokens per program.

  H100, weights from device memory, µs of GPU time against the best of the earlier candidates
  (``bench spmm``, BENCHMARKS.md): ViT-L W1 (1024x4096) / W2 (4096x1024) at 1:32, 4 tokens 2.3
  vs 3.2 / 2.4 vs 3.7, 8 tokens 2.7 vs 3.9 / 2.7 vs 4.7, 16 tokens 3.3 vs 5.0 / 3.4 vs 5.9; 1:8
  at one token 2.5 vs 3.2 / 2.5 vs 2.9; 1:4 at 4 tokens 5.3 vs 6.3 / 5.9 vs 6.3; 1:128 at 197
  tokens 5.0 vs 9.3 / 6.3 vs 11.6 (``"dot"``) with one token per program (W1) and four (W2),
  4.7 / 5.9 with the two-token programs of the table in a later sweep. Not for 2:4, where lanes
  along the columns already read one or two lines (8-byte groups), nor where the tensor-core
  kernels led: 1:4 from 5 tokens on wide outputs and at 16 on narrow ones, 1:8 at 16, 1:16 at 32.
  """
  if density is None or density > 1 / 4:
    return None
  bound = next(b for b in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4) if density <= b)
  for most, block_out, block_k, block_t, warps in _LANES[bound, out_features >= 2048]:
    if tokens <= most:
      return SpmmConfig("gather", block_out, block_k, block_t, warps, 2, outputs_on_lanes=True)
  return None


def candidate_configs(
  tokens: int,
  out_features: int,
  density: float | None = None,
  in_features: int | None = None,
) -> tuple[SpmmConfig, ...]:
  """A few configurations worth timing for ``tokens`` rows, ``out_features`` outputs and (where
  known) the kept fraction ``density = n/m`` and ``in_features``, the default
  (:func:`default_config`) first.

  * first, up to 64 tokens on wide outputs (``O >= 2048``) from density 1/128 down, the
    ``flat`` whole-row ``"gather"`` (:func:`_flat_rows`); then, from density 1/4 down and where
    it was measured fastest, ``"gather"`` with the outputs on the lanes
    (:func:`_lanes_config`); the items below order the rest of the list;
  * whole rows: where ``in_features`` is known (``C = K*density`` kept weights per output) and
    ``density <= 1/32``, up to 16 tokens: ``"gather"`` with one token per program and all ``C``
    columns of ``2048 // C`` outputs (8 warps) and of ``1024 // C`` (4 warps; first for ``C <
    32``) (:func:`_whole_rows`). They lead from 3 tokens (``O >= 2048``) or 4 (narrower) up to 8,
    and up to 16 with at most 2^20 products ``T*O*C`` (:func:`_rows_first`); else they come last;
  * one token: ``"gather"`` with 4 outputs x 512 compressed columns for ``O >= 2048``, else 2 x
    1024 (whole rows in few steps), then twice the outputs; for ``density >= 1/2`` also
    ``"select"`` (4 x 256), first for ``O >= 2048`` after a ``flat`` ``"gather"`` with 8 outputs
    x 256 columns and 8 warps (H100, 2:4, µs of GPU time in two runs: ViT-L W1 4.6 / 4.8 against
    4.9-5.3 for ``"select"`` and the 4 x 512 ``"gather"``, 7.5 for a flat 4 x 512; T5 1.1 base
    768x2048 2.7 against 3.8-4.0; at 2 and 4 tokens and at 1:4 and 1:8 flat tiles lost);
  * 2 to 4 tokens: ``"gather"`` with about 1K compressed columns per program and step: 4 x 256
    and 2 x 512 for ``O >= 2048`` (2 x 512 first for ``density >= 1/2``), 2 x 512 and 4 x 512
    below; for ``O < 2048`` and ``density <= 1/32`` also ``"gather_t"`` (4 outputs x 16
    columns, 2 warps), after them;
  * 5 to 8 tokens: the candidates of the next two items, ``"gather"`` with 8 x 128 and 4 x 256
    (and 2 x 512 with 2-token programs for ``O < 2048`` at density 1/16), the one measured
    fastest for the output width and density first (:func:`_lead_few_tokens`);
  * more, when ``density <= 1/64`` with at most 32 tokens, or ``tokens * density < 1`` (few
    products per output) except for ``O >= 2048`` with at most 16 tokens (there the unsplit
    ``"dot"`` of :func:`_dot_configs` led at 1:32): ``"gather_t"`` first
    (:func:`_gather_t_configs`), then the tensor-core candidates;
  * otherwise: the tensor-core candidates (:func:`_dot_configs`; and ``"gather"`` up to 32
    tokens), then ``"gather_t"``.

  The choices come from ``bench spmm`` on an H100 and an H200 (BENCHMARKS.md), ViT-L FFN shapes:
  at one token ``"gather"`` with few outputs and long steps (H100, µs of GPU time against 16 or
  4 outputs by 128 or 512 columns: W1 2:4 5.0 vs 7.6, 1:4 3.7 vs 4.8, 1:8 3.2 vs 3.5; W2 2:4 5.2
  vs 6.0, 1:4 3.5 vs 3.9, 1:8 2.8 vs 3.3; the chain of dependent loads per program is what
  costs), and ``"select"`` for W1 2:4 (4.5 vs 5.0, two runs); at 2 and 4 tokens about 1K
  columns per step against the earlier 2K gathered elements (4 tokens: W1 1:8 4.0 vs 6.6, 2:4
  9.8 vs 22.2; W2 1:8 4.2 vs 5.0); whole rows with one token per program where few weights are
  kept (H100, weights read from device memory: 4 tokens W1 1:32 3.2 vs 3.9, 1:128 2.5 vs 3.1,
  W2 1:32 3.7 vs 4.9 for ``"gather_t"``; 3 tokens W1 1:32 3.0 vs 3.3, but W2 1:32 3.5 vs 3.2;
  16 tokens at 1:128 W1 2.9 vs 3.7, W2 3.7 vs 4.3; at one and two tokens they lose, W1 1:32 2.7
  vs 2.3 at one token); at 8 tokens see :func:`_lead_few_tokens`; at 16 tokens ``"dot"`` (W1,
  unsplit from 1:4 to 1:32) or ``"dot_gather"`` / tokens-in-``M`` ``"dot"`` (W2) down to 1:16,
  and ``"gather_t"`` at 1:32 on W2 (5.1 vs 5.6 µs for the ``"dot"`` kernel, H100); at 197
  tokens ``"dot"`` with the tokens in ``M``, also at 1:128 (H100: W1 9.2 vs 10.8 µs for
  ``"gather_t"``, W2 11.5 vs 11.6).
  """
  lanes = _lanes_config(tokens, out_features, density)
  others = _candidates(tokens, out_features, density, in_features)
  others = others if lanes is None else (lanes, *others)
  flat_rows = _flat_rows(tokens, out_features, density, in_features)
  return others if flat_rows is None else (flat_rows, *others)


def _kept_per_row(in_features: int, density: float) -> int:
  """``C``, the kept weights per output: ``K * n/m``, at least 1."""
  return max(round(in_features * density), 1)


def _flat_rows(
  tokens: int, out_features: int, density: float | None = None, in_features: int | None = None
) -> SpmmConfig | None:
  """The ``flat`` whole-row ``"gather"`` (:func:`_whole_rows`, 2048 products, 8 warps, one token
  per program) where it led, else None: up to 64 tokens, ``O >= 2048``, ``density <= 1/128`` and
  rows of a power-of-two length (one step). H100, ViT-L W1 1:128 (8 kept weights per row, 256
  outputs per program), µs of GPU time against the outputs-on-lanes ``"gather"``: 1 token 1.7 vs
  2.0, 2 tokens 1.7 vs 2.0, 4 1.8 vs 2.1, 8 1.9 vs 2.2, 16 1.9 vs 2.4, 32 2.1 vs 2.9, 64 2.4 vs
  2.6 (the same tiling with a token axis: 2.3-5.2); at 197 tokens it lost (5.0 vs 4.6). On W2
  (``O = 1024``, 32 per row) flat rows were up to 0.3 µs faster at 2 to 8 tokens and at 64, slower
  at 32 and 197; on W1 1:32 a little faster at 4 and 8 tokens, slower at 32: the rule leaves
  both."""
  if tokens > 64 or out_features < 2048 or in_features is None:
    return None
  if density is None or density > 1 / 128:
    return None
  per_row = _kept_per_row(in_features, density)
  if per_row & (per_row - 1):
    return None
  return _whole_rows(out_features, per_row, 2048, 8)._replace(flat=True)


def _candidates(
  tokens: int, out_features: int, density: float | None, in_features: int | None
) -> tuple[SpmmConfig, ...]:
  """:func:`candidate_configs` without the outputs-on-lanes ``"gather"`` (its list below the
  first item)."""
  block_t = _pow2_at_least(tokens)
  wide = out_features >= 2048
  dense_ish = density is not None and density >= 1 / 2
  rows, lead = (), False
  if in_features is not None and density is not None and density <= 1 / 32 and tokens <= 16:
    per_row = _kept_per_row(in_features, density)
    rows = tuple(_whole_rows(out_features, per_row, p, w) for p, w in ((2048, 8), (1024, 4)))
    rows = rows[::-1] if per_row < 32 else rows
    lead = _rows_first(tokens, out_features, per_row)
  if tokens == 1:
    tilings = ((4, 512), (8, 256)) if wide else ((2, 1024), (4, 512))
  elif tokens <= 4:
    tilings = ((4, 256), (2, 512)) if wide else ((2, 512), (4, 512))
    tilings = tilings[::-1] if wide and dense_ish else tilings
  else:
    tilings = ((8, 128), (4, 256))
  gather = tuple(SpmmConfig("gather", bo, bk, block_t, 4, 2) for bo, bk in tilings)
  if tokens == 1 and dense_ish:
    select = SpmmConfig("select", 4, 256, 1, 4, 2)
    gather = (select, *gather) if wide else (*gather, select)
    if wide:
      gather = (SpmmConfig("gather", 8, 256, 1, 8, 2, flat=True), *gather)
  if tokens <= 4:
    if tokens > 1 and not wide and density is not None and density <= 1 / 32:
      gather += (SpmmConfig("gather_t", 4, 16, block_t, 2, 2),)
    return (*rows, *gather) if lead else (*gather, *rows)
  dots = _dot_configs(tokens, out_features, density)
  gather_t = _gather_t_configs(tokens, out_features, density)
  if tokens <= 8:
    if not wide and density is not None and 1 / 16 <= density < 1 / 8:
      gather += (SpmmConfig("gather", 2, 512, 2, 4, 2),)
    return _lead_few_tokens((*dots, *gather, *rows, *gather_t), wide, density, lead)
  if tokens <= 32:
    dots += (SpmmConfig("gather", 8, max(4096 // (8 * block_t), 8), block_t, 4, 2),)
  if density is not None and (
    (density <= 1 / 64 and tokens <= 32)
    or (tokens * density < 1 and not (out_features >= 2048 and tokens <= 16))
  ):
    others = (*gather_t, *dots)
  else:
    others = (*dots, *gather_t)
  return (*rows, *others) if lead else (*others, *rows)


def default_config(tokens: int, c: NMCompressed) -> SpmmConfig:
  """The configuration :func:`nm_matmul` uses when given none: the first of
  :func:`candidate_configs` for ``c``'s pattern that applies to it, which won in most cases of
  the GPU measurements (BENCHMARKS.md). The tensor-core kernels need ``m`` a power of two and
  ``"select"`` whole groups per step; the gather kernels take any pattern.

  >>> from nm_sparse_jax.export import compress
  >>> default_config(16, compress(jnp.ones((96, 16)), 3, 6)).variant  # m = 6: no "dot"
  'gather'
  """
  configs = candidate_configs(tokens, c.out_features, c.n / c.m, c.in_features)
  for config in configs:
    try:
      _check_config(config, c, tokens)
    except ValueError:
      continue
    return config
  raise ValueError(f"no N:M kernel configuration applies to {c.n}:{c.m} at {tokens} tokens")


def _kept_weights(v_ref, i_ref, row0, c0, *, n, m, block_out, block_k, evict=False, ragged=False):
  """The ``(block_out, block_k)`` kept weights from compressed column ``c0`` on (float32) and
  the input ``k = (c // n)*m + index`` each one multiplies; with ``evict``, loaded with an
  evict-first hint (read once: leave L1 to the gathered inputs). With ``ragged`` the step may
  run past the row: the columns past it get value 0 and the row's last input."""
  per_row = v_ref.shape[1]
  tile = (pl.ds(row0, block_out), pl.ds(c0, block_k))
  policy = "evict_first" if evict else None
  c = c0 + jnp.arange(block_k, dtype=jnp.int32)
  masked = {}
  if ragged:  # (Triton rejects ``other`` without a mask)
    masked = dict(mask=jnp.broadcast_to((c < per_row)[None, :], (block_out, block_k)), other=0)
  v = plgpu.load(v_ref.at[tile], eviction_policy=policy, **masked)
  j = plgpu.load(i_ref.at[tile], eviction_policy=policy, **masked)
  c = jnp.minimum(c, per_row - 1) if ragged else c
  return v.astype(jnp.float32), (c // n)[None, :] * m + j.astype(jnp.int32)


def _kept_by_position(v_ref, i_ref, row0, c0, *, n, block_out, groups):
  """The values and indices of ``groups`` groups' kept weights from compressed column ``c0`` on,
  by position in the group: two lists of ``n`` ``(block_out, groups)`` arrays, the ``q``-th
  holding each group's ``q``-th kept weight (columns ``c0 + q``, stride ``n``)."""
  rows = pl.ds(row0, block_out)
  cols = [pl.ds(c0 + q, groups, stride=n) if n > 1 else pl.ds(c0, groups) for q in range(n)]
  return [v_ref[rows, c] for c in cols], [i_ref[rows, c] for c in cols]


def _prefetched_loop(steps, load, body, acc):
  """``acc = body(i, acc, *load(i))`` for ``i`` in ``range(steps)``, with step ``i+1``'s ``load``
  issued before step ``i``'s ``body``.

  ``body`` consumes the loaded indices through a gather (the gather kernels) or a tile expansion
  (``"dot"``), not directly, so Triton's pipeliner does not overlap the two by itself
  (BENCHMARKS.md, gather kernels: up to 1.5x faster at one token, 5-25% at 16 tokens; 0-15%
  slower with 32-token tiles, not yet special-cased). The last step reloads step
  ``steps - 1`` (unused) rather than reading past the end.
  """

  def step(i, carry):
    acc, *current = carry
    upcoming = load(jnp.minimum(i + 1, steps - 1))
    return (body(i, acc, *current), *upcoming)

  # A traced step index even for step 0: pl.multiple_of does not take a Python int on the GPU.
  acc, *_ = jax.lax.fori_loop(0, steps, step, (acc, *load(jnp.int32(0))))
  return acc


def _gather_kernel(
  x_ref, v_ref, i_ref, o_ref, *, n, m, tokens, block_out, block_k, block_t, outputs_on_lanes, flat
):
  """One program: ``block_out`` outputs by ``block_t`` tokens (the last tile padded).

  The products of a step form a ``(block_out, block_k, block_t)`` tile, or with
  ``outputs_on_lanes`` a ``(block_t, block_k, block_out)`` one: Triton spreads the minor axis
  over the lanes of a warp, so the lanes then hold different outputs at one compressed column,
  whose inputs lie in one group of ``m`` (``2m`` bytes), and a gather touches one or two
  128-byte lines instead of up to 32 (one group per lane along the columns). The weight tile is
  loaded coalesced along the columns and transposed in registers. ``block_k`` need not divide
  the row there (:func:`_check_config` caps it by the row instead): the last step is masked,
  so that rows of ``C = 3*2^j`` columns (T5's 768 inputs) still run in long steps.

  With ``flat`` (one token per program, outputs not on the lanes) the products form a
  ``(block_out, block_k)`` tile: the token is one index for the whole tile, so Triton keeps the
  layout in which the weights were loaded instead of converting them through shared memory into
  a three-dimensional one. H100, µs of GPU time: one token, 2:4, 8 outputs x 256 columns, ViT-L
  W1 4.6-4.8 against 4.9-5.3 for the best tiling with a token axis, T5 768x2048 2.7 against 3.8;
  ViT-L W1 1:128 whole rows (256 outputs x 8 columns) 1.7-2.4 against 2.2-5.2 with a token axis
  at 1 to 64 tokens. Where the tile is wide along the columns (4 x 512) it is slower (W1 2:4 7.5,
  presumably one gather instruction spanning more lines). Outputs on the lanes keep their layout.
  """
  row0 = pl.program_id(0) * block_out
  t0 = pl.program_id(1) * block_t
  per_row = v_ref.shape[1]
  t = jnp.minimum(t0 + jnp.arange(block_t, dtype=jnp.int32), tokens - 1)
  if outputs_on_lanes:
    shape = (block_t, block_k, block_out)
    t3 = jnp.broadcast_to(t[:, None, None], shape)
  else:
    shape = (block_out, block_k, block_t)
    t3 = jnp.broadcast_to(t[None, None, :], shape)
  steps = _cdiv(per_row, block_k)  # the last step masked where block_k does not divide the row
  ragged = per_row % block_k != 0

  def load(i):  # step i's kept weights
    c0 = pl.multiple_of(i * block_k, block_k)
    v, k = _kept_weights(
      v_ref, i_ref, row0, c0, n=n, m=m, block_out=block_out, block_k=block_k, evict=True,
      ragged=ragged,
    )  # fmt: skip
    return (v.T, k.T) if outputs_on_lanes else (v, k)

  if flat:  # one token, (block_out, block_k) tiles
    t2 = jnp.broadcast_to(jnp.minimum(t0, tokens - 1), (block_out, block_k))

    def flat_body(_, acc, v, k):
      return acc + jnp.sum(v * x_ref[t2, k].astype(jnp.float32), axis=1)

    acc = _prefetched_loop(steps, load, flat_body, jnp.zeros((block_out,), jnp.float32))
    _store_outputs(o_ref, acc[None, :], row0, t0, tokens)
    return

  def body(_, acc, v, k):
    if outputs_on_lanes:  # v, k: (block_k, block_out); acc: (block_t, block_out)
      xg = x_ref[t3, jnp.broadcast_to(k[None], shape)].astype(jnp.float32)
      return acc + jnp.sum(v[None] * xg, axis=1)
    xg = x_ref[t3, jnp.broadcast_to(k[:, :, None], shape)].astype(jnp.float32)
    return acc + jnp.sum(v[:, :, None] * xg, axis=1)  # acc: (block_out, block_t)

  acc = jnp.zeros((block_t, block_out) if outputs_on_lanes else (block_out, block_t), jnp.float32)
  acc = _prefetched_loop(steps, load, body, acc)
  _store_outputs(o_ref, acc if outputs_on_lanes else acc.T, row0, t0, tokens)


def _store_outputs(o_ref, y, row0, t0, tokens):
  """Writes ``y`` ``(block_t, block_out)`` (tokens from ``t0``, outputs from ``row0``) to
  ``o_ref[t0:t0 + block_t, row0:row0 + block_out]``, the tokens past ``tokens`` masked."""
  block_t, block_out = y.shape
  t = t0 + jnp.arange(block_t, dtype=jnp.int32)
  ok = jnp.broadcast_to((t < tokens)[:, None], (block_t, block_out))
  tile = (pl.ds(t0, block_t), pl.ds(row0, block_out))
  plgpu.store(o_ref.at[tile], y.astype(o_ref.dtype), mask=ok)


def _select_kernel(x_ref, v_ref, i_ref, o_ref, *, n, m, tokens, block_out, block_k, block_t):
  """One program: ``block_out`` outputs, all tokens (padded to ``block_t``), like
  :func:`_gather_kernel`, but without loads that wait on the index: each step loads the ``m``
  inputs of each of its groups (the same for every output, independent of the index) along with
  the values and indices, and picks each kept weight's input with a select chain over ``j <
  m``."""
  row0 = pl.program_id(0) * block_out
  per_row = v_ref.shape[1]
  groups = block_k // n
  steps = per_row // block_k
  t = jnp.minimum(jnp.arange(block_t, dtype=jnp.int32), tokens - 1)
  t2 = jnp.broadcast_to(t[None, :], (groups, block_t))
  g = jnp.arange(groups, dtype=jnp.int32)[:, None]

  def load(i):  # step i's kept weights (n arrays of (block_out, groups) each) and inputs
    c0 = pl.multiple_of(i * block_k, block_k)
    values, index = _kept_by_position(
      v_ref, i_ref, row0, c0, n=n, block_out=block_out, groups=groups
    )
    values = [v.astype(jnp.float32) for v in values]
    index = [j.astype(jnp.int32) for j in index]
    k0 = i * groups * m
    inputs = [
      x_ref[t2, jnp.broadcast_to(k0 + g * m + j, (groups, block_t))].astype(jnp.float32)
      for j in range(m)
    ]
    return (*values, *index, *inputs)

  def body(_, acc, *loaded):
    values, index, inputs = loaded[:n], loaded[n : 2 * n], loaded[2 * n :]
    for v, idx in zip(values, index):
      idx3 = idx[:, :, None]
      picked = jnp.zeros((block_out, groups, block_t), jnp.float32)
      for j, xj in enumerate(inputs):
        picked = jnp.where(idx3 == j, xj[None, :, :], picked)
      acc = acc + v[:, :, None] * picked
    return acc

  acc = jnp.zeros((block_out, groups, block_t), jnp.float32)
  acc = _prefetched_loop(steps, load, body, acc)
  _store_outputs(o_ref, jnp.sum(acc, axis=1).T, row0, 0, tokens)


def _gather_t_kernel(xt_ref, v_ref, i_ref, o_ref, *, n, m, block_out, block_k, block_t, split_k):
  """One program: ``block_out`` outputs by ``block_t`` tokens by ``C / split_k`` kept weights.

  ``xt_ref`` is ``x^T`` ``(K, T_pad)``, so the ``block_t`` tokens of one gathered input are
  contiguous (one vector load per kept weight instead of one scalar load per token). Products
  accumulate element-wise in a ``(block_out, block_k, block_t)`` float32 tile, reduced once.
  """
  row0 = pl.program_id(0) * block_out
  t0 = pl.multiple_of(pl.program_id(1) * block_t, block_t)
  steps = v_ref.shape[1] // (block_k * split_k)
  first = pl.program_id(2) * steps
  t = t0 + jnp.arange(block_t, dtype=jnp.int32)
  t3 = jnp.broadcast_to(t[None, None, :], (block_out, block_k, block_t))

  def load(i):  # step i's kept weights
    c0 = pl.multiple_of((first + i) * block_k, block_k)
    return _kept_weights(v_ref, i_ref, row0, c0, n=n, m=m, block_out=block_out, block_k=block_k)

  def body(_, acc, v, k):
    k3 = jnp.broadcast_to(k[:, :, None], (block_out, block_k, block_t))
    return acc + v[:, :, None] * xt_ref[k3, t3].astype(jnp.float32)

  acc = jnp.zeros((block_out, block_k, block_t), jnp.float32)
  acc = _prefetched_loop(steps, load, body, acc)
  y = jnp.sum(acc, axis=1).T  # (block_t, block_out)
  tile = (pl.ds(t0, block_t), pl.ds(row0, block_out))
  tile = (pl.program_id(2), *tile) if split_k > 1 else tile
  o_ref[tile] = y.astype(o_ref.dtype)


def _expand_broadcast(values, indices, m):
  """``Wt[o, g*m + j] = values[s][o, g]`` where ``indices[s][o, g] == j`` (else 0), for the ``n``
  kept weights ``s`` of each group: each is broadcast over its group and selected where its
  index matches (a select chain in the values' dtype; the kept positions of a group differ)."""
  block_out, groups = values[0].shape
  j = jnp.arange(m, dtype=jnp.int32)[None, None, :]
  wt = jnp.zeros((block_out, groups, m), values[0].dtype)
  for v, idx in zip(values, indices):
    wt = jnp.where(idx.astype(jnp.int32)[:, :, None] == j, v[:, :, None], wt)
  return wt.reshape(block_out, groups * m)


def _dot_kernel(
  x_ref, v_ref, i_ref, o_ref, *, n, m, tokens, block_out, block_k, block_t, split_k, gather,
  tokens_in_m,
):  # fmt: skip
  """One program: ``block_out`` outputs by ``block_t`` tokens by ``K / split_k`` inputs, a
  tensor-core dot per ``block_k`` tile (``x @ Wt^T`` with ``tokens_in_m``, else ``Wt @ x^T``);
  with ``split_k > 1`` it writes a float32 partial sum.

  The ``(block_out, block_k)`` tile of ``W^T`` is built either from ``(block_out, groups)``
  loads of each kept weight's value and index, prefetched a step ahead and broadcast over the
  group (:func:`_expand_broadcast`; ``gather=False``), or (``gather=True``) straight in two
  dimensions: every position ``(o, g*m + j)`` loads the value and index of group ``g``'s kept
  weights (``m`` lanes read one address, served by L1) and keeps the one whose index is ``j``.
  """
  row0 = pl.program_id(0) * block_out
  t0 = pl.program_id(1) * block_t
  steps = x_ref.shape[1] // (block_k * split_k)
  first = pl.program_id(2) * steps
  block_c = block_k * n // m
  groups = block_k // m
  t = t0 + jnp.arange(block_t, dtype=jnp.int32)
  t_ok = jnp.broadcast_to((t < tokens)[:, None], (block_t, block_k))
  # float32 operands: full float32 products (not TF32); bfloat16 ones: the tensor cores' native.
  precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

  def x_tile(s):
    k0 = pl.multiple_of(s * block_k, block_k)
    return plgpu.load(x_ref.at[pl.ds(t0, block_t), pl.ds(k0, block_k)], mask=t_ok, other=0.0)

  def accumulate(acc, wt, xt):  # acc += x @ Wt^T or acc^T += Wt @ x^T: contract both K axes
    a, b = (xt, wt.astype(xt.dtype)) if tokens_in_m else (wt.astype(xt.dtype), xt)
    return acc + jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )

  acc = jnp.zeros((block_t, block_out) if tokens_in_m else (block_out, block_t), jnp.float32)
  if gather:
    shape = (block_out, block_k)
    rows = jnp.broadcast_to(row0 + jnp.arange(block_out, dtype=jnp.int32)[:, None], shape)
    kk = jnp.arange(block_k, dtype=jnp.int32)[None, :]
    group_col = jnp.broadcast_to((kk // m) * n, shape)
    j = jnp.broadcast_to(kk % m, shape)

    def step(i, acc):
      s = first + i
      wt = None
      for q in range(n):
        cols = s * block_c + group_col + q
        v = v_ref[rows, cols]
        hit = i_ref[rows, cols].astype(jnp.int32) == j
        wt = jnp.where(hit, v, jnp.zeros_like(v) if wt is None else wt)
      return accumulate(acc, wt, x_tile(s))

    acc = jax.lax.fori_loop(0, steps, step, acc)
  else:

    def load(i):  # step i's kept weights
      c0 = pl.multiple_of((first + i) * block_c, block_c)
      values, index = _kept_by_position(
        v_ref, i_ref, row0, c0, n=n, block_out=block_out, groups=groups
      )
      return (*values, *index)

    def body(i, acc, *loaded):
      return accumulate(acc, _expand_broadcast(loaded[:n], loaded[n:], m), x_tile(first + i))

    acc = _prefetched_loop(steps, load, body, acc)
  ok = jnp.broadcast_to((t < tokens)[:, None], (block_t, block_out))
  tile = (pl.ds(t0, block_t), pl.ds(row0, block_out))
  tile = (pl.program_id(2), *tile) if split_k > 1 else tile
  y = acc if tokens_in_m else acc.T
  plgpu.store(o_ref.at[tile], y.astype(o_ref.dtype), mask=ok)


def _check_config(config: SpmmConfig, c: NMCompressed, tokens: int) -> SpmmConfig:
  """Clamps block sizes to the problem so that every block divides its dimension."""
  if config.variant not in VARIANTS:
    raise ValueError(f"SpmmConfig.variant={config.variant!r}; expected one of {VARIANTS}")
  for name in ("block_out", "block_k", "block_t", "num_warps", "split_k"):
    value = getattr(config, name)
    if value < 1 or value & (value - 1):
      raise ValueError(f"SpmmConfig.{name}={value} is not a power of two")
  block_out = _pow2_dividing(c.out_features, config.block_out)
  if config.variant in ("gather", "select", "gather_t"):  # block_k counts compressed columns
    per_row = c.values.shape[1]
    if config.variant == "gather" and config.outputs_on_lanes:  # the last step may be partial
      block_k = min(config.block_k, _pow2_at_least(per_row))
    else:
      block_k = _pow2_dividing(per_row, config.block_k)
    if config.variant == "select":  # whole groups per step
      if block_k % c.n:
        raise ValueError(
          f"the 'select' N:M kernel needs n={c.n} to divide a step of {block_k} compressed "
          f"columns (n a power of two, or a row of whole groups)"
        )
    config = config._replace(block_out=block_out, block_k=block_k, tokens_in_m=False)
    if config.variant != "gather":
      config = config._replace(outputs_on_lanes=False, flat=False)
    if config.variant in ("gather", "select"):  # no split; "select": all tokens in one program
      all_tokens = _pow2_at_least(tokens)
      block_t = all_tokens if config.variant == "select" else min(config.block_t, all_tokens)
      if config.flat and (block_t != 1 or config.outputs_on_lanes):
        raise ValueError(
          f"SpmmConfig.flat=True needs one token per program and the outputs off the lanes, got "
          f"block_t={block_t} (for {tokens} tokens), outputs_on_lanes={config.outputs_on_lanes}"
        )
      return config._replace(block_t=block_t, split_k=1)
    return config._replace(
      block_t=min(config.block_t, _pow2_at_least(tokens)),
      split_k=_pow2_dividing(per_row // block_k, config.split_k),
    )
  if c.m & (c.m - 1):
    raise ValueError(f"the {config.variant!r} N:M kernel needs m a power of two, got m={c.m}")
  block_k = max(_pow2_dividing(c.in_features, config.block_k), c.m)
  if c.in_features % block_k:
    raise ValueError(f"the {config.variant!r} N:M kernel needs m={c.m} to divide K={c.in_features}")
  split_k = _pow2_dividing(c.in_features // block_k, config.split_k)
  return config._replace(
    block_out=block_out,
    block_k=block_k,
    block_t=min(config.block_t, _pow2_at_least(tokens)),
    split_k=split_k,
    outputs_on_lanes=False,
    flat=False,
  )


@functools.partial(jax.jit, static_argnames=("n", "m", "config", "interpret"))
def _nm_matmul_2d(x, values, index, *, n, m, config, interpret):
  tokens = x.shape[0]
  out_features = values.shape[0]
  kwargs = dict(
    n=n, m=m, tokens=tokens, block_out=config.block_out, block_k=config.block_k,
    block_t=config.block_t,
  )  # fmt: skip
  out_shape = jax.ShapeDtypeStruct((tokens, out_features), x.dtype)
  if config.variant in ("gather", "select"):
    body = _select_kernel
    if config.variant == "gather":
      body = functools.partial(
        _gather_kernel, outputs_on_lanes=config.outputs_on_lanes, flat=config.flat
      )
    kernel = functools.partial(body, **kwargs)
    grid = (out_features // config.block_out, _cdiv(tokens, config.block_t))
  elif config.variant == "gather_t":
    del kwargs["tokens"]
    kernel = functools.partial(_gather_t_kernel, split_k=config.split_k, **kwargs)
    padded = _cdiv(tokens, config.block_t) * config.block_t
    x = jnp.pad(x, ((0, padded - tokens), (0, 0))).T  # (K, T_pad), tokens minor
    grid = (out_features // config.block_out, padded // config.block_t, config.split_k)
    dtype = jnp.float32 if config.split_k > 1 else x.dtype
    out_shape = jax.ShapeDtypeStruct(
      ((config.split_k,) * (config.split_k > 1)) + (padded, out_features), dtype
    )
  else:
    gather = config.variant == "dot_gather"
    kernel = functools.partial(
      _dot_kernel, split_k=config.split_k, gather=gather, tokens_in_m=config.tokens_in_m, **kwargs
    )
    grid = (out_features // config.block_out, _cdiv(tokens, config.block_t), config.split_k)
    if config.split_k > 1:
      out_shape = jax.ShapeDtypeStruct((config.split_k, tokens, out_features), jnp.float32)
  y = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
    interpret=interpret,
    name=f"nm_matmul_{config.variant}_{n}_{m}",
  )(x, values, index)
  y = jnp.sum(y, axis=0).astype(x.dtype) if y.ndim == 3 else y
  return y[:tokens]


def nm_matmul(
  x: jax.typing.ArrayLike,
  w: NMCompressed,
  *,
  config: SpmmConfig | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """``x @ W`` for a compressed N:M kernel ``w`` seen as ``(K, O)``, contracting ``x``'s last axis.

  ``y[..., o] = sum_c w.values[o, c] * x[..., (c // n)*m + w.index[o, c]]``, accumulated in
  float32 and returned in ``x``'s dtype; ``x`` is cast to ``w.values``' dtype (bfloat16 for the
  GPU kernels).

  Args:
    x: ``(..., K)`` activations.
    w: the compressed kernel (:func:`~nm_sparse_jax.export.compress`).
    config: kernel and block sizes; default :func:`default_config` for the token count.
    interpret: run in Pallas interpret mode; default: when the default backend is not a GPU.

  Returns:
    ``(..., O)``.

  Raises:
    ValueError: ``x``'s last axis is not ``K``, or a bad ``config``.
    ImportError: this JAX lacks Pallas's Triton backend.

  >>> from nm_sparse_jax.export import compress
  >>> w = jnp.array([[0.0, 1.0], [3.0, 0.0], [0.0, 0.0], [-2.0, 4.0]])  # (in=4, out=2), 1:2
  >>> nm_matmul(jnp.array([[1.0, 2.0, 3.0, 4.0]]), compress(w, 1, 2))
  Array([[-2., 17.]], dtype=float32)
  """
  require("nm_matmul")
  x = jnp.asarray(x)
  k = w.in_features
  if x.shape[-1] != k:
    raise ValueError(f"nm_matmul: x has shape {x.shape}; its last axis must be K={k}")
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), k).astype(w.values.dtype)
  tokens = x2.shape[0]
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  config = _check_config(config or default_config(tokens, w), w, tokens)
  y = _nm_matmul_2d(x2, w.values, w.index, n=w.n, m=w.m, config=config, interpret=interpret)
  return y.reshape(*lead, w.out_features).astype(x.dtype)


def nm_matmul_reference(x: jax.typing.ArrayLike, w: NMCompressed) -> jax.Array:
  """The same product with XLA ops (gather + multiply + sum), float32 accumulation."""
  x = jnp.asarray(x)
  per_row = w.values.shape[1]
  k = (jnp.arange(per_row, dtype=jnp.int32) // w.n)[None, :] * w.m + w.index.astype(jnp.int32)
  gathered = jnp.take(x.astype(jnp.float32), k, axis=-1)  # (..., O, C)
  values = w.values.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + w.values.shape)
  y = jnp.sum(gathered * values, axis=-1)
  return y.astype(x.dtype)

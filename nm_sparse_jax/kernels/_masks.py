"""The N:M magnitude mask in one Pallas (Triton) kernel: one read of ``x``, one write of the mask.

Same result as :func:`nm_sparse_jax.nm_mask`: in every group of ``m`` along the contraction axis,
the ``n`` largest ``|x|``, ties to the lower index. Magnitudes are compared as the integer bit
pattern of ``|x|`` (``key``, 31 bits for float32, 15 for bfloat16/float16; NaN above infinity).

Layout. A program owns ``block_c`` columns (elements after the contraction axis) of one row of
groups. A group of ``m = chunks * sub`` elements is held as ``sub`` arrays of shape
``(chunks, block_c)``, array ``i`` holding elements ``q*sub + i`` (``q < chunks``), one element
per thread: each thread keeps ``sub`` elements of one group in registers, so a count over the
group is ``sub`` in-thread additions plus, when ``chunks > 1``, one sum over the ``chunks``
threads (or warps) that share the group. Earlier versions let Triton lay a 3-D tile out, which
spread each group over the lanes of a warp and spent most instructions on shuffles (on an H100,
26.6M instructions for a bfloat16 4:32 mask of 1024x4096, against 8.5M with whole groups per
thread; BENCHMARKS.md).

With ``MaskConfig.packed`` (16-bit floats), a thread holds two adjacent columns in each 32-bit
word and counts both groups' keys at once: per 16-bit lane, ``0x8000 + key - mid`` has bit 15
set exactly where ``key >= mid`` and never borrows from the other lane.

For each group:

1. ``theta``, the ``n``-th largest key: for ``n = 1`` the largest key; otherwise by interval
   bisection, halving the interval with one comparison and one count over the group per step,
   ``bit_length(hi - lo)`` steps (the program's widest group). With ``MaskConfig.order_bounds``
   (the default for 16-bit floats with ``m <= 128`` and for float32 groups held whole by a
   thread with ``n <= 8``) the interval is ``[min a, max a]`` over the parts' ``r``-th largest
   keys ``a`` (a part: a thread's elements, or a slice of them; ``r = ceil(n / parts)``;
   :func:`_order_bounds`); where a thread holds a whole group that is the ``n``-th largest
   itself and there is no bisection. Otherwise ``[lo, max key]``, ``lo`` the largest minimum
   over parts of at least ``n`` of a thread's elements (at least ``n`` keys are ``>= lo``), or
   the group's minimum where a thread holds fewer than ``n`` (and, with the early stop, for
   ``n < 8``). With ``early_stop`` a group with exactly ``n`` keys ``>= mid`` is resolved at
   ``mid``, and the loop ends once every group of the program is;
2. ``need = n - #(key > theta)`` ties are still to keep: the ``need`` lowest-index elements with
   ``key == theta``, ranked by the ties in earlier chunks (an exclusive prefix sum over the
   chunks) plus the ties before them in their own chunk. With packed words both lanes' flags,
   counts and ranks are computed in the words, as the bisection counts
   (:func:`_store_keep_packed`).

``keep = key > theta  or  (key == theta  and  rank <= need)``. The cost is at most ``bits + 2``
counts per element, the same for every ``n > 1`` (16:128 as cheap as 2:128); memory traffic is
the read of ``x`` plus one byte per element.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nm_sparse_jax._masks import contraction_axes, parse_nm
from nm_sparse_jax.kernels._backend import available, pl, plgpu, require

__all__ = [
  "MASK_KERNEL_ENV",
  "MaskConfig",
  "default_mask_config",
  "mask_kernel_applies",
  "nm_mask_pallas",
  "use_mask_kernel",
]

MASK_KERNEL_ENV = "NM_SPARSE_JAX_MASK_KERNEL"
_KEY = {4: (jnp.int32, 31), 2: (jnp.int16, 15)}
# Largest group the kernel takes: 32 chunks of 32 elements, one program of 1024 threads.
_MAX_M = 1024
_MAX_THREADS = 1024
_MAX_COLUMN_BLOCKS = 65535  # the grid's second dimension (CUDA's y)
# With early_stop, the part-minimum lower bound is used from this n on (see _lower_bound).
_EARLY_STOP_BOUND_MIN_N = 8
# With MaskConfig.order_bounds, parts are split until their order statistic is at most this.
_MAX_ORDER = 8


class MaskConfig(NamedTuple):
  """How a program holds its groups (module docstring): ``sub`` elements of a group per thread,
  ``block_c`` columns per program, and whether the bisection may stop early.

  A program runs ``chunks * block_c`` threads (``chunks = m // sub``, at most 1024), one element
  of each of its ``sub`` arrays per thread. :func:`default_mask_config` gives the tilings
  measured fastest.

  Attributes:
    sub: elements of a group per thread (a power of two; ``min(sub, m)`` is used).
    block_c: columns per program (a power of two; the largest power of two dividing the
      columns, if smaller).
    early_stop: end the bisection once every group of the program is resolved.
    packed: for 16-bit floats, hold two adjacent columns in one 32-bit word and count both
      groups' keys with one subtraction (``block_c`` columns are ``block_c / 2`` words, one per
      thread); ignored for float32.
    order_bounds: start the bisection from order statistics of parts of the group
      (:func:`_order_bounds`) instead of ``[part minimum, max key]``.
  """

  sub: int = 32
  block_c: int = 32
  early_stop: bool = False
  packed: bool = False
  order_bounds: bool = False


def default_mask_config(
  m: int, dtype: jax.typing.DTypeLike = jnp.float32, n: int | None = None
) -> MaskConfig:
  """The layout measured fastest for ``n:m`` groups in ``dtype`` (H100, BENCHMARKS.md).

  * float32 (31-bit keys), with ``early_stop``: whole groups per thread up to ``m = 32`` (256
    columns per program for ``m <= 4``, 128 for ``m = 8, 16``, 32 for ``m = 32``); 16 elements
    per thread in 4 chunks x 8 columns for ``m = 64``; 32 per thread, chunks x 8 columns from
    ``m = 128`` on; ``order_bounds`` where a thread holds a whole group and ``n <= 8`` (the
    ``n``-th largest in-thread, no bisection);
  * 16-bit floats (15-bit keys), no early stop, ``order_bounds`` for ``n > 1`` up to ``m =
    128``: ``m <= 16`` whole groups, 256 columns for ``m <= 4``, 128 for ``m = 8, 16``; ``m =
    32`` and ``m = 64`` two columns per word (``packed``), chunks of 16, 64 columns (32 words);
    ``m = 128`` with ``n > 1`` packed too, chunks of 16 x 32 columns (16 words; 8 chunks per
    group); otherwise chunks of 32 x 32 columns (one warp per chunk).

  GPU time against one multiply of the same arrays, T5 1.1 base and ViT-L FF kernels: every
  pattern from 1:2 to 16:128 at most 1.47x; bfloat16 16:128 1.34x-1.47x, 8:64 1.20x-1.24x, 4:32
  1.16x-1.18x; float32 16:128 1.14x-1.47x; 2:4 0.69x-0.72x (bfloat16) and 0.48x-0.55x (float32).
  Side by side: the order bounds against ``[part minimum, max key]`` (bfloat16, with the packed
  keep flags) 16:128 1.34x-1.48x against 1.55x-1.60x, 4:32 1.13x against 1.29x; 256 columns
  against 64 for 2:4 in bfloat16 0.69x-0.72x against 1.04x-1.13x. Packed words pay at ``m =
  128`` only in chunks of 16, and not for ``n = 1`` (no bisection: 1:128 1.00x / 1.07x against
  0.96x / 1.00x, before the packed keep flags).

  >>> default_mask_config(32, jnp.bfloat16)
  MaskConfig(sub=16, block_c=64, early_stop=False, packed=True, order_bounds=False)
  >>> default_mask_config(4, jnp.bfloat16, n=2)
  MaskConfig(sub=4, block_c=256, early_stop=False, packed=False, order_bounds=True)
  """
  # Small groups held whole by a thread: wide programs (both dtypes, BENCHMARKS.md).
  small_group_columns = 256 if m <= 4 else 128
  if jnp.dtype(dtype).itemsize == 4:
    if m <= 16:
      sub, block_c = m, small_group_columns
    else:
      sub, block_c = (m, 32) if m <= 32 else (16, 8) if m == 64 else (32, 8)
    exact = m <= 32 and n is not None and 1 < n <= _MAX_ORDER  # the n-th largest in-thread
    return MaskConfig(sub, block_c, early_stop=True, order_bounds=exact)
  order = n is not None and n > 1 and m <= 128
  if m <= 16:
    return MaskConfig(m, small_group_columns, order_bounds=order)
  if m <= 64:
    return MaskConfig(16, 64, packed=True, order_bounds=order)
  if m == 128 and order:
    return MaskConfig(16, 32, packed=True, order_bounds=True)
  return MaskConfig(32, 32)


def mask_kernel_applies(x: jax.Array, n: int, m: int, axes: Sequence[int]) -> bool:
  """Whether :func:`nm_mask_pallas` handles this case: a 16- or 32-bit float and ``m`` a power
  of two (Triton tiles have power-of-two sizes), at most 1024."""
  del n, axes
  return (
    jnp.issubdtype(x.dtype, jnp.floating)
    and x.dtype.itemsize in _KEY
    and m & (m - 1) == 0
    and m <= _MAX_M
  )


def _fits_grid(x: jax.Array, n: int, m: int, axes: Sequence[int]) -> bool:
  """Whether the default layout for ``x`` has at most 65535 column blocks (the grid's limit)."""
  post = math.prod(x.shape[axes[-1] + 1 :])
  return post // _block_c(default_mask_config(m, x.dtype, n), post) <= _MAX_COLUMN_BLOCKS


def use_mask_kernel(x: jax.Array, n: int, m: int, axes: Sequence[int]) -> bool:
  """Whether :func:`~nm_sparse_jax.nm_mask` on a GPU uses this kernel instead of XLA.

  Opt-in, through the environment variable ``NM_SPARSE_JAX_MASK_KERNEL``:

  * unset or ``0`` (default): never. The kernel is written for Pallas's Triton backend, which
    JAX 0.11 deprecates (lowering it raises a ``DeprecationWarning``), and a Pallas call is not
    partitioned by XLA's SPMD partitioner (under ``pjit`` it would gather sharded kernels);
  * ``auto``: with a single device, wherever the kernel applies: it measured faster than XLA
    in GPU time for every pattern from 1:2 to 16:128 (H100, T5 1.1 base and ViT-L FF kernels,
    side by side, BENCHMARKS.md), as a fraction of one multiply of the same arrays: 2:4
    0.69x-0.72x against 0.85x-0.90x (bfloat16) and 0.48x-0.55x against 0.57x-0.59x (float32);
    1:2 0.54x-0.87x against 1.05x-1.16x; 1:4 0.47x-0.70x against 1.15x-1.55x; 4:8 0.48x-0.67x
    against 0.92x-1.37x; 2:32 0.56x-1.16x against 2.2x-3.6x; 16:128 1.14x-1.47x against
    10x-28x;
  * ``1``: wherever it applies (:func:`nm_mask_pallas` raises an ``ImportError`` where this JAX
    lacks Pallas's Triton backend).

  Either way XLA keeps arrays whose columns would need more than 65535 programs; with ``auto``
  also everything, where the Triton backend is missing.
  """
  setting = os.environ.get(MASK_KERNEL_ENV, "0")
  if setting not in ("auto", "1") or not mask_kernel_applies(x, n, m, axes):
    return False
  if not _fits_grid(x, n, m, axes):
    return False
  if setting == "1":
    return True
  if not available():
    return False
  return jax.device_count() == 1


def _tree(values, op):
  """``op``-reduction of a list of arrays, pairwise (a shallow dependency chain)."""
  values = list(values)
  while len(values) > 1:
    pairs = [op(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]
    values = pairs + values[len(pairs) * 2 :]
  return values[0]


def _bit_length(v):
  """Bits of the non-negative int32 ``v`` (0 for 0), from the exponent of ``float32(v)``; may
  exceed the exact count by one where the conversion rounds up to a power of two."""
  f = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
  return jnp.where(v > 0, (f >> 23) - 126, 0)


def _group(values, op, reduce, chunks):
  """Reduces the ``sub`` arrays ``(chunks, block_c)`` of a group to ``(1, block_c)``."""
  total = _tree(values, op)
  return reduce(total, axis=0, keepdims=True) if chunks > 1 else total


def _nth_largest(lo, hi, count, n, early_stop):
  """Interval bisection for each group's ``n``-th largest key, known to lie in ``[lo, hi]``.

  ``lo``, ``hi``: lists (one per packed lane) of ``(1, block_c)`` int32 bounds; ``count(mid)``
  returns the number of keys ``>= mid`` per group, in the same form. Each step halves every
  interval, so ``bit_length(max(hi - lo))`` steps (the program's widest group) leave ``lo``
  equal to the ``n``-th largest key. With ``early_stop``, a group with exactly ``n`` keys
  ``>= mid`` is resolved at ``mid`` (those are its ``n`` largest), and the loop ends once every
  group of the program is.
  """
  steps = _bit_length(_tree([jnp.max(top - bottom) for bottom, top in zip(lo, hi)], jnp.maximum))

  def step(bounds):
    lo, hi = bounds
    # lo + ceil((hi - lo) / 2), without overflow
    mid = [top - ((top - bottom) >> 1) for bottom, top in zip(lo, hi)]
    found = count(mid)
    new_lo, new_hi = [], []
    for f, md, bottom, top in zip(found, mid, lo, hi):
      up = f >= n
      new_lo.append(jnp.where(up, md, bottom))
      top = jnp.where(up, top, md - 1)
      new_hi.append(jnp.where(f == n, md, top) if early_stop else top)
    return new_lo, new_hi

  if not early_stop:
    return jax.lax.fori_loop(0, steps, lambda _, b: step(b), (lo, hi))[0]

  def unresolved(state):
    i, lo, hi = state
    unequal = [jnp.sum((top != bottom).astype(jnp.int32)) for bottom, top in zip(lo, hi)]
    open_groups = _tree(unequal, jnp.add)
    return (i < steps) & (open_groups > 0)

  state = (jnp.int32(0), lo, hi)
  _, lo, _ = jax.lax.while_loop(unresolved, lambda s: (s[0] + 1, *step(s[1:])), state)
  return lo


def _lower_bound(keys, n, chunks, early_stop):
  """A key at most each group's ``n``-th largest: the largest of the minima of parts of at least
  ``n`` elements (every element of such a part is ``>=`` its minimum, so at least ``n`` are); the
  group's minimum where a thread holds fewer than ``n`` elements. Costs what the group's minimum
  does (a tree of mins, then of maxes) and narrows the bisection's interval: for 4:32 in bfloat16
  it starts from the largest of 8 minima of 4.

  With ``early_stop`` and ``n < 8`` the group's minimum: such a bound often lies just below the
  ``n``-th largest key, so the bisection, which comes down from the top, meets a count of exactly
  ``n`` only near its last steps (H100, float32, GPU time of a multiply with the bound against
  without it: 2:32 1.40x against 1.17x, but 16:128 1.42x against 1.48x)."""
  part = 1 << (n - 1).bit_length()  # the smallest power of two >= n
  if part > len(keys) or (early_stop and n < _EARLY_STOP_BOUND_MIN_N):
    return _group(keys, jnp.minimum, jnp.min, chunks)
  minima = [_tree(keys[j : j + part], jnp.minimum) for j in range(0, len(keys), part)]
  return _group(minima, jnp.maximum, jnp.max, chunks)


def _merge_largest(a, b, r):
  """The ``r`` largest of the union of two descending lists of arrays (elementwise), descending:
  the ``k``-th is ``max over i + j = k of min(a_i, b_j)``, with ``a_0 = b_0 = +inf``."""
  merged = []
  for k in range(1, min(r, len(a) + len(b)) + 1):
    terms = []
    for i in range(max(0, k - len(b)), min(k, len(a)) + 1):
      j = k - i
      terms.append(b[j - 1] if i == 0 else a[i - 1] if j == 0 else jnp.minimum(a[i - 1], b[j - 1]))
    merged.append(_tree(terms, jnp.maximum))
  return merged


def _rth_largest(keys, r):
  """The ``r``-th largest of a list of arrays, elementwise (``r <= len(keys)``), by a tree of
  merges of descending lists cut at ``r`` (``r**2`` min/max per merge at most)."""
  lists = [[k] for k in keys]
  while len(lists) > 1:
    pairs = [_merge_largest(lists[i], lists[i + 1], r) for i in range(0, len(lists) - 1, 2)]
    lists = pairs + lists[len(pairs) * 2 :]
  return lists[0][r - 1]


def _order_bounds(keys, n, chunks):
  """``(lo, hi, exact)``: each group's ``n``-th largest key lies in ``[lo, hi]``.

  Cut the group into ``k`` parts (the ``chunks`` threads' elements, each thread's split in ``p``)
  and take each part's ``r``-th largest key ``a``, ``r = ceil(n / k)``. Every part has at least
  ``r`` keys ``>= a`` and at most ``r - 1`` keys ``> a``, so at least ``k r >= n`` keys are
  ``>= min a`` and at most ``k (r - 1) < n`` are ``> max a``: ``lo = min a``, ``hi = max a``.
  ``p`` is the smallest power of two with ``r <= 8`` (the merges cost ``r**2``). With one part
  (``exact``) the bound is the ``n``-th largest itself and no bisection is needed.

  For normally distributed bfloat16 weights, 16:128 in 8 chunks of 16 (``r = 2``) leaves 8
  bisection steps where ``[part minimum, max key]`` leaves 10 (the mean over 200 programs of 32
  groups, computed with NumPy); 4:8 in whole groups none.

  One group of 8 in 2 chunks (threads holding 5, 1, 9, 7 and 3, 8, 2, 6), 3:8: the chunks'
  second largest keys are 7 and 6, and the third largest of the group, 7, lies in ``[6, 7]``.

  >>> keys = [jnp.array([[a], [b]]) for a, b in ((5, 3), (1, 8), (9, 2), (7, 6))]
  >>> lo, hi, exact = _order_bounds(keys, 3, 2)
  >>> int(lo[0, 0]), int(hi[0, 0]), exact
  (6, 7, False)
  """
  sub = len(keys)
  parts = 1
  while -(-n // (chunks * parts)) > _MAX_ORDER and parts < sub:
    parts *= 2
  r = -(-n // (chunks * parts))
  size = sub // parts
  stats = [_rth_largest(keys[j : j + size], r) for j in range(0, sub, size)]
  lo = _group(stats, jnp.minimum, jnp.min, chunks)
  hi = _group(stats, jnp.maximum, jnp.max, chunks)
  return lo, hi, chunks == 1 and parts == 1


def _store_keep(keys, theta, n, chunks, store):
  """``keep = key > theta  or  (key == theta  and  rank <= need)`` for one lane's ``sub``
  arrays of keys, written with ``store(i, flags)``."""
  need = n - _group([(k > theta).astype(jnp.int32) for k in keys], jnp.add, jnp.sum, chunks)
  ties = [(k == theta).astype(jnp.int32) for k in keys]
  if chunks > 1:  # ties in the group's earlier chunks
    per_chunk = _tree(ties, jnp.add)
    rank = jnp.cumsum(per_chunk, axis=0) - per_chunk
  else:
    rank = jnp.zeros(theta.shape, jnp.int32)
  for i, (k, tie) in enumerate(zip(keys, ties)):
    rank = rank + tie
    store(i, (k > theta) | ((tie > 0) & (rank <= need)))


_LANE_BITS = 0x10001  # bit 0 of each 16-bit lane of a word


def _both_lanes(values):
  """Two lanes' 16-bit values (``[lane 0, lane 1]`` int32 arrays) in one word, lane 0 low."""
  return values[0].astype(jnp.uint32) | (values[1].astype(jnp.uint32) << 16)


def _at_least(biased, both):
  """Per word of ``biased`` (``0x8000 + key`` per lane), ``key >= both``'s lane as bit 0 of
  that lane: bit 15 of ``0x8000 + key - mid``, which stays in its lane for ``mid <= 0x8000``."""
  return [((b - both) >> 15) & jnp.uint32(_LANE_BITS) for b in biased]


def _store_keep_packed(biased, theta, n, chunks, store):
  """:func:`_store_keep` for two 16-bit lanes per word, counted as in the bisection.

  ``biased``: the words with bit 15 of each lane set (``0x8000 + key``); ``theta``: the two
  lanes' thresholds. Per lane, bit 15 of ``0x8000 + key - theta`` is ``key >= theta``, of
  ``0x8000 + key - (theta + 1)`` is ``key > theta``, and of ``0x8000 + need - rank`` is ``rank <=
  need``; no field leaves its lane (``theta + 1 <= 0x8000``, counts at most ``m``), so both
  lanes' flags, counts and ranks take one operation each, and ``keep`` has lane 0's flag in
  bit 0 and lane 1's in bit 16. Written with ``store(i, keep)``.
  """
  u32 = jnp.uint32
  both = _both_lanes(theta)
  at_least = _at_least(biased, both)
  greater = _at_least(biased, both + u32(_LANE_BITS))  # key >= theta + 1
  ties = [a - g for a, g in zip(at_least, greater)]
  need = u32(n * _LANE_BITS) - _group(greater, jnp.add, jnp.sum, chunks)  # >= 1 per lane
  if chunks > 1:  # ties in the group's earlier chunks
    per_chunk = _tree(ties, jnp.add)
    rank = jnp.cumsum(per_chunk, axis=0) - per_chunk
  else:
    rank = jnp.zeros(both.shape, u32)
  need = need | u32(0x80008000)
  for i, (g, tie) in enumerate(zip(greater, ties)):
    rank = rank + tie
    store(i, g | (tie & ((need - rank) >> 15)))


def _mask_kernel(
  x_ref, o_ref, *, n, m, sub, bits, key_dtype, block_c, early_stop, packed, order_bounds
):
  chunks = m // sub
  row = pl.program_id(0)
  c0 = pl.multiple_of(pl.program_id(1) * block_c, block_c)  # words when packed

  def rows(i):  # array i of the group: elements q*sub + i of its chunks q
    return pl.ds(i, chunks, stride=sub) if chunks > 1 else pl.ds(i, 1)

  group_max = functools.partial(_group, op=jnp.maximum, reduce=jnp.max, chunks=chunks)
  if packed:  # two 16-bit columns per uint32 word: the even column in the low half
    words = [x_ref[row, rows(i), pl.ds(c0, block_c)] & jnp.uint32(0x7FFF7FFF) for i in range(sub)]
    lanes = [
      [(w & jnp.uint32(0xFFFF)).astype(jnp.int32) for w in words],
      [(w >> 16).astype(jnp.int32) for w in words],
    ]
    # Per 16-bit lane, 0x8000 + key - mid is in [1, 0xFFFF] (no borrow into the other lane) and
    # has bit 15 set where key >= mid: one subtraction, shift and mask count two keys.
    biased = [w | jnp.uint32(0x80008000) for w in words]

    def count(mid):
      total = _group(_at_least(biased, _both_lanes(mid)), jnp.add, jnp.sum, chunks)
      return [(total & jnp.uint32(0xFFFF)).astype(jnp.int32), (total >> 16).astype(jnp.int32)]

  else:
    sign_off = (1 << bits) - 1
    lanes = [[
      jax.lax.bitcast_convert_type(x_ref[row, rows(i), pl.ds(c0, block_c)], key_dtype)
      .astype(jnp.int32) & sign_off
      for i in range(sub)
    ]]  # fmt: skip

    def count(mid):
      return [_group([(k >= mid[0]).astype(jnp.int32) for k in lanes[0]], jnp.add, jnp.sum, chunks)]

  if n == 1:  # the largest key; no bisection
    theta = [group_max(keys) for keys in lanes]
  elif order_bounds:
    bounds = [_order_bounds(keys, n, chunks) for keys in lanes]
    lo, hi = [b[0] for b in bounds], [b[1] for b in bounds]
    theta = lo if bounds[0][2] else _nth_largest(lo, hi, count, n, early_stop)
  else:
    lo = [_lower_bound(keys, n, chunks, early_stop) for keys in lanes]
    hi = [group_max(keys) for keys in lanes]
    theta = _nth_largest(lo, hi, count, n, early_stop)
  if packed:

    def store_both(i, keep):
      for lane in (0, 1):
        cols = pl.ds(2 * c0 + lane, block_c, stride=2)
        o_ref[row, rows(i), cols] = ((keep >> (16 * lane)) & jnp.uint32(1)) != 0

    _store_keep_packed(biased, theta, n, chunks, store_both)
  else:

    def store(i, flags):
      o_ref[row, rows(i), pl.ds(c0, block_c)] = flags

    _store_keep(lanes[0], theta[0], n, chunks, store)


def _block_c(config: MaskConfig, cols: int) -> int:
  """Columns per program: ``config.block_c`` or the largest power of two dividing ``cols``."""
  return min(config.block_c, cols & -cols)


def _resolve(config: MaskConfig, m: int, cols: int, itemsize: int) -> tuple[int, int, int, bool]:
  """``(sub, block_c, num_warps, packed)`` of ``config`` for groups of ``m``, ``cols`` columns
  of ``itemsize``-byte floats (``block_c`` in words of two columns when ``packed``)."""
  for name in ("sub", "block_c"):
    value = getattr(config, name)
    if value < 1 or value & (value - 1):
      raise ValueError(f"MaskConfig.{name}={value} is not a power of two")
  sub = min(config.sub, m)
  block_c = _block_c(config, cols)
  if cols // block_c > _MAX_COLUMN_BLOCKS:
    raise ValueError(
      f"{cols} columns in blocks of {block_c}: {cols // block_c} column blocks, more than "
      f"{_MAX_COLUMN_BLOCKS}; use a MaskConfig with a larger block_c"
    )
  # Two columns per word need 16-bit floats and an even number of columns per program; a thread
  # then holds one word (two columns), so a program runs half as many threads.
  packed = config.packed and itemsize == 2 and block_c >= 2
  words = block_c // 2 if packed else block_c
  threads = (m // sub) * words
  if threads > _MAX_THREADS:
    per = f"{words} words of two columns" if packed else f"{block_c} columns"
    raise ValueError(
      f"MaskConfig(sub={config.sub}, block_c={config.block_c}, packed={config.packed}) for "
      f"m={m}: {m // sub} chunks x {per} = {threads} threads per program, more than "
      f"{_MAX_THREADS}"
    )
  return sub, words, max(threads // 32, 1), packed


@functools.partial(jax.jit, static_argnames=("n", "m", "axes", "interpret", "config"))
def _mask(x, *, n, m, axes, interpret, config):
  pre = math.prod(x.shape[: axes[0]])
  size = math.prod(x.shape[a] for a in axes)
  post = math.prod(x.shape[axes[-1] + 1 :])
  rows = pre * (size // m)
  x3 = x.reshape(rows, m, post)
  sub, block_c, num_warps, packed = _resolve(config, m, post, x.dtype.itemsize)
  key_dtype, bits = _KEY[x.dtype.itemsize]
  if packed:  # (rows, m, post / 2) words; a bitcast, not a copy
    x3 = jax.lax.bitcast_convert_type(x3.reshape(rows, m, post // 2, 2), jnp.uint32)
  kernel = functools.partial(
    _mask_kernel, n=n, m=m, sub=sub, bits=bits, key_dtype=key_dtype, block_c=block_c,
    early_stop=config.early_stop, packed=packed, order_bounds=config.order_bounds,
  )  # fmt: skip
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((rows, m, post), jnp.bool_),
    grid=(rows, x3.shape[2] // block_c),
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=interpret,
    name=f"nm_mask_{n}_{m}",
  )(x3)
  return out.reshape(x.shape)


def nm_mask_pallas(
  x: jax.typing.ArrayLike,
  n: int,
  m: int,
  *,
  axis: int | Sequence[int] = 0,
  interpret: bool | None = None,
  config: MaskConfig | None = None,
) -> jax.Array:
  """:func:`~nm_sparse_jax.nm_mask` as one Pallas kernel (GPU; interpret mode elsewhere).

  ``mask[..., i, ...]`` is True for the ``n`` largest ``|x|`` of each group of ``m`` along the
  contraction ``axis`` (ties to the lower index); see the module docstring for the algorithm.

  Args:
    x: float32, bfloat16 or float16 array.
    n, m: the pattern; ``m`` a power of two dividing the axis; static.
    axis: the contraction axis or adjacent axes (flattened row-major); static.
    interpret: Pallas interpret mode; default: when the default backend is not a GPU.
    config: layout of a program (default :func:`default_mask_config` for the pattern and the
      dtype).

  Raises:
    ValueError: a bad pattern or axis, an unsupported dtype or ``m``, or ``m`` does not divide
      the axis.
    ImportError: this JAX lacks Pallas's Triton backend.

  >>> w = jnp.array([[0.1, -3.0], [2.0, 0.5], [-0.2, 0.4], [1.0, 0.0]])
  >>> nm_mask_pallas(w, 2, 4, axis=0).astype(int)
  Array([[0, 1],
         [1, 1],
         [0, 0],
         [1, 0]], dtype=int32)
  """
  require("nm_mask_pallas")
  x = jnp.asarray(x)
  n, m = parse_nm((n, m), name="n:m")
  axes = contraction_axes(axis, x.ndim)
  if not mask_kernel_applies(x, n, m, axes):
    raise ValueError(
      f"nm_mask_pallas handles float32/bfloat16/float16 and m a power of two <= {_MAX_M}; "
      f"got dtype {x.dtype}, m={m}"
    )
  size = math.prod(x.shape[a] for a in axes)
  if size % m:
    raise ValueError(
      f"x with shape {x.shape}: axes {axes} have size {size}, not divisible by m={m}"
    )
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  # The mask is piecewise constant in x: no derivative flows (and none into the kernel).
  config = config or default_mask_config(m, x.dtype, n)
  return _mask(jax.lax.stop_gradient(x), n=n, m=m, axes=axes, interpret=interpret, config=config)

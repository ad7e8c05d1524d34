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

For each group:

1. a threshold ``theta`` with ``#(key >= theta) >= n``, by bisection on the bits of the ``n``-th
   largest key, high to low (one comparison and one count over the group per bit). With
   ``early_stop`` the bisection ends once every group of the program has exactly ``n`` keys
   ``>= theta`` (then those are its ``n`` largest); otherwise, after all bits, ``theta`` is the
   ``n``-th largest key;
2. ``need = n - #(key > theta)`` ties are still to keep: the ``need`` lowest-index elements with
   ``key == theta``, ranked by the ties in earlier chunks (an exclusive prefix sum over the
   chunks) plus the ties before them in their own chunk.

``keep = key > theta  or  (key == theta  and  rank <= need)``. The cost is at most ``bits + 1``
counts per element, the same for every ``n`` (16:128 as cheap as 1:128); memory traffic is the
read of ``x`` plus one byte per element.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nm_sparse_jax._masks import contraction_axes, parse_nm

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
  """

  sub: int = 32
  block_c: int = 32
  early_stop: bool = False


def default_mask_config(m: int, dtype: jax.typing.DTypeLike = jnp.float32) -> MaskConfig:
  """The layout measured fastest for groups of ``m`` in ``dtype`` (H100, BENCHMARKS.md).

  * float32 (31-bit keys), with ``early_stop``: whole groups per thread up to ``m = 32``
    (32 columns per program); 16 elements per thread in 4 chunks x 8 columns for ``m = 64``;
    32 per thread, chunks x 8 columns from ``m = 128`` on;
  * 16-bit floats (15-bit keys), all bits: ``m <= 8`` whole groups, 64 columns (two per
    thread); ``m = 16`` whole groups, 32 columns; ``m = 32`` two chunks of 16 x 16 columns;
    ``m = 64`` four chunks of 16 x 8 columns; from ``m = 128`` on, chunks of 32 x 32 columns
    (one warp per chunk).

  GPU time against one multiply of the same arrays (768x2048 / 4096x1024): float32 4:32 1.27x /
  0.96x, 8:64 1.35x / 1.08x, 16:128 1.56x / 1.29x; bfloat16 1.52x / 1.37x, 1.70x / 1.55x, 1.73x /
  1.96x; the previous layout took 2.1x-2.4x, 1.6x-1.8x, 1.8x-1.9x and 3.9x-4.0x, 2.9x-3.1x,
  3.2x-3.3x.

  >>> default_mask_config(32, jnp.bfloat16)
  MaskConfig(sub=16, block_c=16, early_stop=False)
  """
  if jnp.dtype(dtype).itemsize == 4:
    sub, block_c = (m, 32) if m <= 32 else (16, 8) if m == 64 else (32, 8)
    return MaskConfig(sub, block_c, early_stop=True)
  if m <= 16:
    return MaskConfig(m, 64 if m <= 8 else 32)
  sub, block_c = {32: (16, 16), 64: (16, 8)}.get(m, (32, 32))
  return MaskConfig(sub, block_c)


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


def _fits_grid(x: jax.Array, m: int, axes: Sequence[int]) -> bool:
  """Whether the default layout for ``x`` has at most 65535 column blocks (the grid's limit)."""
  post = math.prod(x.shape[axes[-1] + 1 :])
  return post // _block_c(default_mask_config(m, x.dtype), post) <= _MAX_COLUMN_BLOCKS


def use_mask_kernel(x: jax.Array, n: int, m: int, axes: Sequence[int]) -> bool:
  """Whether :func:`~nm_sparse_jax.nm_mask` on a GPU uses this kernel instead of XLA.

  Opt-in, through the environment variable ``NM_SPARSE_JAX_MASK_KERNEL``:

  * unset or ``0`` (default): never. The kernel is written for Pallas's Triton backend, which
    JAX 0.11 deprecates (lowering it raises a ``DeprecationWarning``), and a Pallas call is not
    partitioned by XLA's SPMD partitioner (under ``pjit`` it would gather sharded kernels);
  * ``auto``: with a single device, where the kernel applies and was measured faster than XLA
    in GPU time (H100, BENCHMARKS.md): wherever XLA needs more than one pass over ``x``
    (``min(n, m-n) > 1`` and ``m > 16``: 2:32 0.9x-1.5x of a multiply against 2.2x-3.6x, 16:128
    1.3x-2.0x against 10x-28x), and for the one-pass argmax patterns (``n = 1`` or ``n = m-1``)
    with ``m >= 8`` in 16-bit floats, or ``8 <= m <= 32`` in float32 (bfloat16 1:32 1.4x-1.5x
    against 2.1x-2.3x; float32 1:8 to 1:32 0.8x-1.2x against 1.1x-1.5x). XLA keeps ``m <= 4``, the
    all-pairs patterns of ``m <= 16`` (float32 4:8 0.9x) and the float32 argmax patterns of
    ``m >= 64`` (1:128 1.3x-1.4x, the kernel 1.3x-1.6x);
  * ``1``: wherever it applies.

  Either way XLA keeps arrays whose columns would need more than 65535 programs.
  """
  setting = os.environ.get(MASK_KERNEL_ENV, "0")
  if setting not in ("auto", "1") or not mask_kernel_applies(x, n, m, axes):
    return False
  if not _fits_grid(x, m, axes):
    return False
  if setting == "1":
    return True
  passes = min(n, m - n)
  argmax = passes == 1 and m >= 8 and (x.dtype.itemsize == 2 or m <= 32)
  return jax.device_count() == 1 and ((passes > 1 and m > 16) or argmax)


def _tree_sum(values):
  """Pairwise sum of a list of arrays (a shallow dependency chain)."""
  values = list(values)
  while len(values) > 1:
    pairs = [values[i] + values[i + 1] for i in range(0, len(values) - 1, 2)]
    values = pairs + values[len(pairs) * 2 :]
  return values[0]


def _mask_kernel(x_ref, o_ref, *, n, m, sub, bits, key_dtype, block_c, early_stop):
  chunks = m // sub
  row = pl.program_id(0)
  c0 = pl.multiple_of(pl.program_id(1) * block_c, block_c)

  def at(i):  # array i of the group: elements q*sub + i of its chunks q, the program's columns
    rows = pl.ds(i, chunks, stride=sub) if chunks > 1 else pl.ds(i, 1)
    return row, rows, pl.ds(c0, block_c)

  sign_off = (1 << bits) - 1
  keys = [
    jax.lax.bitcast_convert_type(x_ref[at(i)], key_dtype).astype(jnp.int32) & sign_off
    for i in range(sub)
  ]

  def count(flags):  # (chunks, block_c) flags per array -> (1, block_c) counts per group
    total = _tree_sum([f.astype(jnp.int32) for f in flags])
    return jnp.sum(total, axis=0, keepdims=True) if chunks > 1 else total

  def bisect(i, theta, found):
    cand = theta | jnp.left_shift(jnp.int32(1), bits - 1 - i)
    found_cand = count([k >= cand for k in keys])
    up = found_cand >= n
    return jnp.where(up, cand, theta), jnp.where(up, found_cand, found)

  groups = (1, block_c)
  state = (jnp.zeros(groups, jnp.int32), jnp.full(groups, m, jnp.int32))
  if early_stop:  # until every group of the program has exactly n keys >= theta

    def unresolved(s):
      return (s[0] < bits) & (jnp.sum((s[2] != n).astype(jnp.int32)) > 0)

    _, theta, _ = jax.lax.while_loop(
      unresolved, lambda s: (s[0] + 1, *bisect(*s)), (jnp.int32(0), *state)
    )
  else:
    theta, _ = jax.lax.fori_loop(0, bits, lambda i, s: bisect(i, *s), state)
  above = [k > theta for k in keys]
  need = n - count(above)
  ties = [(k == theta).astype(jnp.int32) for k in keys]
  if chunks > 1:  # ties in the group's earlier chunks
    per_chunk = _tree_sum(ties)
    rank = jnp.cumsum(per_chunk, axis=0) - per_chunk
  else:
    rank = jnp.zeros(groups, jnp.int32)
  for i in range(sub):
    rank = rank + ties[i]
    o_ref[at(i)] = above[i] | ((ties[i] > 0) & (rank <= need))


def _block_c(config: MaskConfig, cols: int) -> int:
  """Columns per program: ``config.block_c`` or the largest power of two dividing ``cols``."""
  return min(config.block_c, cols & -cols)


def _resolve(config: MaskConfig, m: int, cols: int) -> tuple[int, int, int]:
  """``(sub, block_c, num_warps)`` of ``config`` for groups of ``m`` and ``cols`` columns."""
  for name in ("sub", "block_c"):
    value = getattr(config, name)
    if value < 1 or value & (value - 1):
      raise ValueError(f"MaskConfig.{name}={value} is not a power of two")
  sub = min(config.sub, m)
  block_c = _block_c(config, cols)
  threads = (m // sub) * block_c
  if threads > _MAX_THREADS:
    raise ValueError(
      f"MaskConfig(sub={config.sub}, block_c={config.block_c}) for m={m}: {m // sub} chunks x "
      f"{block_c} columns = {threads} threads per program, more than {_MAX_THREADS}"
    )
  if cols // block_c > _MAX_COLUMN_BLOCKS:
    raise ValueError(
      f"{cols} columns in blocks of {block_c}: {cols // block_c} column blocks, more than "
      f"{_MAX_COLUMN_BLOCKS}; use a MaskConfig with a larger block_c"
    )
  return sub, block_c, max(threads // 32, 1)


@functools.partial(jax.jit, static_argnames=("n", "m", "axes", "interpret", "config"))
def _mask(x, *, n, m, axes, interpret, config):
  pre = math.prod(x.shape[: axes[0]])
  size = math.prod(x.shape[a] for a in axes)
  post = math.prod(x.shape[axes[-1] + 1 :])
  rows = pre * (size // m)
  x3 = x.reshape(rows, m, post)
  sub, block_c, num_warps = _resolve(config, m, post)
  key_dtype, bits = _KEY[x.dtype.itemsize]
  kernel = functools.partial(
    _mask_kernel, n=n, m=m, sub=sub, bits=bits, key_dtype=key_dtype, block_c=block_c,
    early_stop=config.early_stop,
  )  # fmt: skip
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(x3.shape, jnp.bool_),
    grid=(rows, post // block_c),
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
    config: layout of a program (default :func:`default_mask_config` for ``m`` and the dtype).

  Raises:
    ValueError: a bad pattern or axis, an unsupported dtype or ``m``, or ``m`` does not divide
      the axis.

  >>> w = jnp.array([[0.1, -3.0], [2.0, 0.5], [-0.2, 0.4], [1.0, 0.0]])
  >>> nm_mask_pallas(w, 2, 4, axis=0).astype(int)
  Array([[0, 1],
         [1, 1],
         [0, 0],
         [1, 0]], dtype=int32)
  """
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
  config = config or default_mask_config(m, x.dtype)
  return _mask(jax.lax.stop_gradient(x), n=n, m=m, axes=axes, interpret=interpret, config=config)

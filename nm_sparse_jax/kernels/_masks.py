"""The N:M magnitude mask in one Pallas (Triton) kernel: one read of ``x``, one write of the mask.

Same result as :func:`nm_sparse_jax.nm_mask`: in every group of ``m`` along the contraction axis,
the ``n`` largest ``|x|``, ties to the lower index. Magnitudes are compared as the integer bit
pattern of ``|x|`` (``key``, 31 bits for float32, 15 for bfloat16/float16; NaN above infinity).
For each group, held in registers:

1. a threshold ``theta`` with ``#(key >= theta) >= n``, by bisection on the bits of the ``n``-th
   largest key, high to low (one comparison and one sum over the group per bit). The bisection
   stops early once every group of the program's tile has exactly ``n`` keys ``>= theta``
   (then those are its ``n`` largest); otherwise, after all bits, ``theta`` is the ``n``-th
   largest key;
2. ``need = n - #(key > theta)`` ties are still to keep: the ``need`` lowest-index elements with
   ``key == theta``, found by an inclusive prefix count of the ties along the group (with the
   early stop, every element with ``key == theta`` is kept).

``keep = key > theta  or  (key == theta  and  prefix_count <= need)``. The cost is at most
``bits + 1`` passes over registers, the same for every ``n`` (16:128 as cheap as 1:128), and
memory traffic is the read of ``x`` plus one byte per element. For float32 weights the early
stop typically comes after the exponent and the leading mantissa bits that separate the
``n``-th from the ``n+1``-th largest magnitude, well before all 31 bits.
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
# Largest group the kernel takes (one group must fit a program's tile).
_TILE = 4096


class MaskConfig(NamedTuple):
  """Tile of one program, ``(block_groups, m, block_cols)``, and its warps.

  The defaults (:func:`default_mask_config`) were the fastest tilings measured (BENCHMARKS.md):
  one warp per program keeps each group's reductions inside a warp, and small tiles (a 128-group
  and 4 columns for 16:128) let the bisection stop as soon as the few groups of the tile are
  resolved (16:128, float32, H200: 1.3x-1.5x of a multiply with 512 elements per program,
  1.7x-2.3x with 2048).

  Attributes:
    block_c: columns (elements after the contraction axis) per program, at most.
    tile: elements per program (``block_groups = tile // (m * block_c)``, at least 1).
    num_warps: warps per program.
  """

  block_c: int = 32
  tile: int = 512
  num_warps: int = 1


def default_mask_config(m: int) -> MaskConfig:
  """One warp, ``max(256, 4*m)`` elements per program: 4 columns of a group of ``m >= 64``, 8 of
  a group of 32. On an H100 (BENCHMARKS.md), 256-element tiles against 512 took 1.25x-1.88x vs
  1.49x-1.98x of a multiply for 4:32 and 1.09x-1.58x vs 1.22x-1.70x for 8:64 (a tie on some
  shapes), while 16:128 needs its 4 columns (512: 1.22x-1.91x, 256: 1.42x-2.60x).
  """
  return MaskConfig(block_c=32, tile=max(256, 4 * m), num_warps=1)


def mask_kernel_applies(x: jax.Array, n: int, m: int, axes: Sequence[int]) -> bool:
  """Whether :func:`nm_mask_pallas` handles this case: a 16- or 32-bit float and ``m`` a power
  of two (Triton tiles have power-of-two sizes), at most ``_TILE``."""
  del n, axes
  return (
    jnp.issubdtype(x.dtype, jnp.floating)
    and x.dtype.itemsize in _KEY
    and m & (m - 1) == 0
    and m <= _TILE
  )


def use_mask_kernel(x: jax.Array, n: int, m: int, axes: Sequence[int]) -> bool:
  """Whether :func:`~nm_sparse_jax.nm_mask` on a GPU uses this kernel instead of XLA.

  Opt-in, through the environment variable ``NM_SPARSE_JAX_MASK_KERNEL``:

  * unset or ``0`` (default): never. The kernel is written for Pallas's Triton backend, which
    JAX 0.11 deprecates (lowering it raises a ``DeprecationWarning``), and a Pallas call is not
    partitioned by XLA's SPMD partitioner (under ``pjit`` it would gather sharded kernels);
  * ``auto``: where the kernel applies and XLA needs more than two passes over ``x``
    (``min(n, m-n) > 2`` and ``m > 16``, e.g. SDGF's 16:128), with a single device. The
    XLA cases of one or two passes (``min(n, m-n) <= 2``, or ``m <= 16``) were measured as
    fast as the kernel or faster;
  * ``1``: wherever it applies.
  """
  setting = os.environ.get(MASK_KERNEL_ENV, "0")
  if setting not in ("auto", "1") or not mask_kernel_applies(x, n, m, axes):
    return False
  return setting == "1" or (jax.device_count() == 1 and min(n, m - n) > 2 and m > 16)


def _mask_kernel(x_ref, o_ref, *, n, m, bits, key_dtype, rows, cols, block_r, block_c):
  r = pl.program_id(0) * block_r + jnp.arange(block_r, dtype=jnp.int32)
  c = pl.program_id(1) * block_c + jnp.arange(block_c, dtype=jnp.int32)
  j = jnp.arange(m, dtype=jnp.int32)
  shape = (block_r, m, block_c)
  r3 = jnp.broadcast_to(r[:, None, None], shape)
  j3 = jnp.broadcast_to(j[None, :, None], shape)
  c3 = jnp.broadcast_to(c[None, None, :], shape)
  # Clamped loads stay in bounds; the store below is masked.
  x = x_ref[jnp.minimum(r3, rows - 1), j3, jnp.minimum(c3, cols - 1)]
  sign_off = (1 << bits) - 1
  key = (jax.lax.bitcast_convert_type(x, key_dtype).astype(jnp.int32)) & sign_off

  def unresolved(state):
    i, _, count = state
    return (i < bits) & (jnp.sum((count != n).astype(jnp.int32)) > 0)

  def bisect(state):
    i, theta, count = state
    cand = theta | jnp.left_shift(jnp.int32(1), bits - 1 - i)
    count_cand = jnp.sum((key >= cand).astype(jnp.int32), axis=1, keepdims=True)
    up = count_cand >= n
    return i + 1, jnp.where(up, cand, theta), jnp.where(up, count_cand, count)

  # Stop once every group of the tile has exactly n keys >= theta: its mask is then key >= theta.
  groups = (block_r, 1, block_c)
  state = (jnp.int32(0), jnp.zeros(groups, jnp.int32), jnp.full(groups, m, jnp.int32))
  _, theta, _ = jax.lax.while_loop(unresolved, bisect, state)
  above = key > theta
  need = n - jnp.sum(above.astype(jnp.int32), axis=1, keepdims=True)
  tie = key == theta
  rank = jnp.cumsum(tie.astype(jnp.int32), axis=1)
  keep = above | (tie & (rank <= need))
  ok = (r3 < rows) & (c3 < cols)
  plgpu.store(o_ref.at[r3, j3, c3], keep, mask=ok)


@functools.partial(jax.jit, static_argnames=("n", "m", "axes", "interpret", "config"))
def _mask(x, *, n, m, axes, interpret, config):
  pre = math.prod(x.shape[: axes[0]])
  size = math.prod(x.shape[a] for a in axes)
  post = math.prod(x.shape[axes[-1] + 1 :])
  rows = pre * (size // m)
  x3 = x.reshape(rows, m, post)
  block_c = min(1 << max(post - 1, 0).bit_length(), max(config.tile // m, 1), config.block_c)
  block_r = max(config.tile // (m * block_c), 1)
  key_dtype, bits = _KEY[x.dtype.itemsize]
  kernel = functools.partial(
    _mask_kernel, n=n, m=m, bits=bits, key_dtype=key_dtype, rows=rows, cols=post,
    block_r=block_r, block_c=block_c,
  )  # fmt: skip
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(x3.shape, jnp.bool_),
    grid=(pl.cdiv(rows, block_r), pl.cdiv(post, block_c)),
    compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
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
    config: tile and warps (default :func:`default_mask_config`).

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
      f"nm_mask_pallas handles float32/bfloat16/float16 and m a power of two <= {_TILE}; "
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
  config = config or default_mask_config(m)
  return _mask(jax.lax.stop_gradient(x), n=n, m=m, axes=axes, interpret=interpret, config=config)

"""The Pallas kernels against NumPy: on a CPU in Pallas interpret mode, compiled on a GPU."""

import functools
import itertools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import nm_mask
from nm_sparse_jax.export import compress, decompress
from nm_sparse_jax.kernels import (
  SpmmConfig,
  _masks,
  candidate_configs,
  default_config,
  default_mask_config,
  nm_mask_pallas,
  nm_matmul,
  nm_matmul_reference,
  use_mask_kernel,
)
from nm_sparse_jax.kernels._masks import MASK_KERNEL_ENV, MaskConfig, mask_kernel_applies
from nm_sparse_jax.kernels._spmm import _check_config, _flat_rows

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="compiled Pallas Triton kernels need a GPU")


def _nm_weight(key, k, o, n, m, dtype):
  w = jax.random.normal(key, (k, o), jnp.float32).astype(dtype)
  return jnp.where(nm_mask(w, n, m, axis=0), w, jnp.zeros((), dtype))


def _relerr(y, w, x):
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)


def _rest(*args):
  """:func:`candidate_configs` after the flat whole-row ``"gather"`` and the outputs-on-lanes
  ``"gather"`` that lead where they apply (:func:`test_flat_candidates`,
  :func:`test_outputs_on_lanes_candidates`)."""
  configs = candidate_configs(*args)
  configs = configs[1:] if configs[0] == _flat_rows(*args) else configs
  return configs[1:] if configs[0].outputs_on_lanes else configs


SPMM = [
  # (K, O, n, m, T, config)
  (128, 32, 1, 16, 3, SpmmConfig("gather", 16, 64, 4)),  # block_k clamped to the 8 per row
  (128, 16, 2, 8, 1, SpmmConfig("gather", 8, 32, 1, num_warps=2)),
  # Token tiles over programs: one token per program; two, the last tile padded; 2 steps.
  (128, 32, 1, 16, 3, SpmmConfig("gather", 16, 8, 1, 8)),
  (256, 16, 1, 8, 5, SpmmConfig("gather", 8, 16, 2)),
  # The inputs picked by a select chain: one step, several steps, tokens, m up to 16.
  (128, 16, 2, 4, 1, SpmmConfig("select", 4, 64, 1)),
  (256, 32, 1, 8, 3, SpmmConfig("select", 8, 8, 4, num_warps=2)),  # 4 steps, 3 of 4 tokens
  (128, 16, 4, 8, 1, SpmmConfig("select", 2, 16, 1)),
  (128, 8, 1, 16, 5, SpmmConfig("select", 4, 64, 8)),  # block_k clamped to the 8 per row
  (128, 32, 1, 8, 20, SpmmConfig("dot", 16, 64, 16)),
  (256, 32, 2, 4, 37, SpmmConfig("dot", 32, 64, 16, split_k=2)),
  (256, 16, 1, 32, 18, SpmmConfig("dot", 16, 128, 32, split_k=4)),  # split clamped to 2
  (64, 16, 4, 8, 16, SpmmConfig("dot", 16, 32, 16)),
  (96, 16, 1, 8, 9, SpmmConfig("dot", 16, 32, 16, split_k=2)),  # 3 K steps: split -> 1
  (128, 32, 1, 8, 20, SpmmConfig("dot_gather", 16, 64, 16)),
  (256, 32, 2, 4, 37, SpmmConfig("dot_gather", 16, 64, 16, split_k=2)),
  (64, 16, 4, 8, 16, SpmmConfig("dot_gather", 16, 32, 16)),
  (256, 16, 1, 32, 18, SpmmConfig("dot_gather", 16, 128, 32, split_k=4)),  # split clamped to 2
  # Tokens in the matrix unit's M dimension (x tile as the left operand).
  (128, 32, 1, 8, 20, SpmmConfig("dot", 16, 64, 16, tokens_in_m=True)),
  (256, 32, 2, 4, 37, SpmmConfig("dot", 32, 64, 16, split_k=2, tokens_in_m=True)),
  (64, 16, 4, 8, 16, SpmmConfig("dot_gather", 16, 32, 16, tokens_in_m=True)),
  (128, 32, 1, 8, 20, SpmmConfig("gather_t", 8, 4, 8)),  # 3 token tiles, the last padded
  (256, 16, 2, 4, 5, SpmmConfig("gather_t", 16, 8, 4, split_k=4)),
  (96, 8, 1, 12, 1, SpmmConfig("gather_t", 8, 64, 16, split_k=2)),  # m not a power of two
  (128, 16, 3, 8, 33, SpmmConfig("gather_t", 4, 16, 32, split_k=2)),  # C=48: block_k -> 16
  # The outputs on the lanes: whole rows, steps, token pairs with the last one padded, n > 1,
  # m not a power of two.
  (256, 64, 1, 32, 3, SpmmConfig("gather", 16, 8, 1, outputs_on_lanes=True)),
  (256, 64, 1, 8, 5, SpmmConfig("gather", 8, 8, 2, 2, outputs_on_lanes=True)),
  (256, 32, 2, 4, 4, SpmmConfig("gather", 4, 64, 2, outputs_on_lanes=True)),
  (96, 16, 1, 12, 1, SpmmConfig("gather", 16, 4, 1, 8, outputs_on_lanes=True)),
  # ... and steps that do not divide the row (the last one masked): 24 and 6 columns per row.
  (96, 16, 1, 4, 3, SpmmConfig("gather", 8, 16, 2, outputs_on_lanes=True)),
  (96, 16, 2, 8, 2, SpmmConfig("gather", 4, 16, 2, 2, outputs_on_lanes=True)),
  (192, 32, 1, 32, 5, SpmmConfig("gather", 16, 8, 1, outputs_on_lanes=True)),
  # Flat one-token tiles (no token axis): several steps, whole rows, one token per program over
  # three tokens, n = 3, m not a power of two.
  (128, 32, 2, 4, 1, SpmmConfig("gather", 8, 16, 1, 8, flat=True)),
  (256, 64, 1, 128, 1, SpmmConfig("gather", 64, 2, 1, flat=True)),
  (96, 16, 1, 12, 3, SpmmConfig("gather", 4, 4, 1, flat=True)),
  (128, 16, 3, 8, 2, SpmmConfig("gather", 4, 16, 1, 2, flat=True)),
]


@pytest.mark.parametrize("k, o, n, m, t, config", SPMM)
def test_nm_matmul_interpret_matches_float64(k, o, n, m, t, config):
  kw, kx = jax.random.split(jax.random.key(k + o + t))
  w = _nm_weight(kw, k, o, n, m, jnp.float32)
  x = jax.random.normal(kx, (t, k), jnp.float32)
  y = jax.jit(lambda x, c: nm_matmul(x, c, config=config, interpret=True))(x, compress(w, n, m))
  assert y.shape == (t, o) and y.dtype == jnp.float32
  assert _relerr(y, w, x) < 1e-5


def test_nm_matmul_bfloat16_and_leading_axes():
  w = _nm_weight(jax.random.key(0), 64, 32, 1, 8, jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 3, 64), jnp.float32).astype(jnp.bfloat16)
  y = nm_matmul(x, compress(w, 1, 8), interpret=True)
  assert y.shape == (2, 3, 32) and y.dtype == jnp.bfloat16
  ref_x = np.asarray(x.astype(jnp.float32)).reshape(6, 64)
  assert (
    _relerr(np.asarray(y.astype(jnp.float32)).reshape(6, 32), w.astype(jnp.float32), ref_x) < 1e-2
  )


def test_nm_matmul_reference_matches_decompressed_product():
  w = _nm_weight(jax.random.key(2), 32, 8, 2, 4, jnp.float32)
  x = jax.random.normal(jax.random.key(3), (5, 32))
  c = compress(w, 2, 4)
  assert _relerr(nm_matmul_reference(x, c), decompress(c), x) < 1e-6


def test_configs():
  c = compress(jnp.ones((16, 4096)), 1, 4)
  assert default_config(1, c) == candidate_configs(1, 4096, 1 / 4, 16)[0]
  assert {c.variant for c in _rest(4, 1024)} == {"gather"}
  # One token: few outputs per program, long steps (2 x 1024 or 4 x 512 compressed columns).
  assert _rest(1, 1024)[0] == SpmmConfig("gather", 2, 1024, 1, 4, 2)
  assert _rest(1, 4096)[0] == SpmmConfig("gather", 4, 512, 1, 4, 2)
  # 2 to 4 tokens: about 1K compressed columns per program and step.
  assert _rest(4, 4096)[0] == SpmmConfig("gather", 4, 256, 4, 4, 2)
  assert _rest(4, 4096, 1 / 2)[0] == SpmmConfig("gather", 2, 512, 4, 4, 2)
  assert _rest(3, 1024)[0] == SpmmConfig("gather", 2, 512, 4, 4, 2)
  # ... and the token-tiled gather for few kept weights on narrow outputs, after them.
  assert _rest(3, 1024, 1 / 32)[-1] == SpmmConfig("gather_t", 4, 16, 4, 2, 2)
  assert _rest(2, 1024, 1 / 32)[-1] == SpmmConfig("gather_t", 4, 16, 2, 2, 2)
  assert {c.variant for c in _rest(4, 4096, 1 / 32)} == {"gather"}
  # At one token the select chain for dense patterns: first on wide outputs (after a flat
  # gather), last on narrow.
  assert _rest(1, 4096, 1 / 2)[0] == SpmmConfig("gather", 8, 256, 1, 8, 2, flat=True)
  assert _rest(1, 4096, 1 / 2)[1] == SpmmConfig("select", 4, 256, 1, 4, 2)
  assert _rest(1, 1024, 1 / 2)[2] == SpmmConfig("select", 4, 256, 1, 4, 2)
  assert "select" not in {c.variant for c in _rest(1, 4096, 1 / 4)}
  # 5 to 8 tokens: the 16-token candidates (with 8-token tiles) and two gather tilings, the one
  # measured fastest for the width and density first.
  eight = _rest(8, 4096, 1 / 8)
  assert {c.variant for c in eight} == {"dot", "dot_gather", "gather", "gather_t"}
  assert SpmmConfig("gather", 8, 128, 8, 4, 2) in eight and all(c.block_t == 8 for c in eight)
  assert eight[0] == SpmmConfig("dot", 32, 256, 8, 4, 3, 4)
  assert _rest(6, 4096, 1 / 32)[0] == SpmmConfig("gather", 8, 128, 8, 4, 2)
  assert _rest(8, 4096, 1 / 64)[0].variant == "gather_t"
  assert _rest(8, 1024, 1 / 4)[0] == SpmmConfig("dot", 32, 256, 8, 4, 3, 4)
  assert _rest(8, 1024, 1 / 8)[0] == SpmmConfig("dot", 32, 128, 8, 4, 3, 8, True)
  assert _rest(8, 1024, 1 / 16)[0] == SpmmConfig("gather", 2, 512, 2, 4, 2)
  assert _rest(5, 1024, 1 / 32)[0] == SpmmConfig("gather_t", 4, 64, 8, 4, 2, 1)
  assert len(set(eight)) == len(eight) == len(_rest(8, 4096, 1 / 32))
  # Above 32 tokens: the tokens in the matrix unit's M dimension, ~128 programs; the tiling by
  # density; the outputs-in-M tiling third.
  assert _rest(197, 4096)[0] == SpmmConfig("dot", 64, 128, 128, 8, 3, 1, True)
  assert _rest(197, 4096)[1] == SpmmConfig("dot", 32, 128, 256, 8, 3, 1, True)
  assert _rest(197, 4096)[2] == SpmmConfig("dot", 32, 128, 256, 8, 3, 1)
  assert _rest(197, 4096, 1 / 4)[0] == SpmmConfig("dot", 32, 128, 256, 8, 3, 1, True)
  assert _rest(197, 4096, 1 / 2)[0] == SpmmConfig("dot", 32, 128, 256, 8, 3, 1)
  assert _rest(197, 1024, 1 / 2)[0] == SpmmConfig("dot", 64, 64, 256, 8, 3, 8)
  assert len(_rest(197, 1024, 1 / 2)) == len(_rest(197, 1024, 1 / 8))
  assert _rest(197, 1024, 1 / 32)[0] == SpmmConfig("dot", 64, 128, 128, 8, 4, 4, True)
  assert _rest(197, 1024, 1 / 16)[0] == SpmmConfig("dot", 64, 64, 256, 4, 3, 8, True)
  assert _rest(197, 1024, 1 / 4)[0] == SpmmConfig("dot", 64, 64, 256, 8, 3, 8, True)
  assert _rest(197, 1024, 1 / 16)[2] == SpmmConfig("dot", 64, 64, 256, 8, 3, 8)
  assert _rest(4096, 1024)[0] == SpmmConfig("dot", 64, 128, 128, 8, 4, 1, True)
  assert _rest(64, 4096, 1 / 8)[0] == SpmmConfig("dot", 64, 128, 64, 8, 3, 2, True)
  # Up to 32 tokens: ~512 programs; the gathered tile first on narrow outputs and for 2:4.
  assert _rest(16, 1024)[0] == SpmmConfig("dot_gather", 16, 128, 16, 4, 3, 8)
  assert _rest(16, 1024)[1] == SpmmConfig("dot", 32, 256, 16, 4, 3, 4)
  # ... except from 1:8 on narrow outputs: the tokens in M first.
  assert _rest(16, 1024, 1 / 8)[0] == SpmmConfig("dot", 32, 128, 16, 4, 3, 8, True)
  assert _rest(16, 1024, 1 / 4)[0].variant == "dot_gather"
  # Wide outputs, at most 16 tokens, density <= 1/4: an unsplit dot first, then the split one.
  assert _rest(16, 4096, 1 / 8)[0] == SpmmConfig("dot", 16, 256, 16, 2, 3, 1)
  assert _rest(16, 4096, 1 / 8)[1] == SpmmConfig("dot", 32, 256, 16, 4, 3, 4)
  assert _rest(16, 4096, 1 / 8)[2] == SpmmConfig("dot_gather", 16, 256, 16, 4, 3, 2)
  assert _rest(16, 4096, 1 / 4)[0] == SpmmConfig("dot", 16, 256, 16, 4, 2, 1)
  assert _rest(16, 4096, 1 / 16)[0] == SpmmConfig("dot", 32, 256, 16, 4, 3, 1)
  assert _rest(8 + 1, 4096, 1 / 32)[0] == SpmmConfig("dot", 32, 256, 16, 4, 3, 1)
  assert _rest(32, 4096, 1 / 8)[0] == SpmmConfig("dot", 32, 256, 32, 4, 3, 4)
  assert _rest(16, 4096, 1 / 2)[0].variant == "dot_gather"
  variants = {c.variant for c in _rest(16, 4096, 1 / 8)}
  assert variants == {"dot", "dot_gather", "gather", "gather_t"}
  # Few kept weights per output: the token-tiled gather first, the dot kernels still tried.
  # Up to 16 tokens: wide outputs 16 x 32 with 8 warps; narrow ones 4 x 32 with 4 warps first
  # down to density 1/64, the 8-warp tiling first below.
  assert _rest(16, 4096, 1 / 32)[4] == SpmmConfig("gather_t", 16, 32, 16, 8, 2, 1)
  assert _rest(16, 4096, 1 / 32)[5] == SpmmConfig("gather_t", 16, 16, 16, 4, 2, 1)
  assert _rest(16, 4096, 1 / 128)[0] == SpmmConfig("gather_t", 16, 32, 16, 8, 2, 1)
  assert _rest(32, 4096, 1 / 64)[0] == SpmmConfig("gather_t", 16, 8, 32, 4, 2, 1)
  assert _rest(32, 4096, 1 / 64)[2] == SpmmConfig("gather_t", 16, 16, 32, 8, 2, 1)
  assert _rest(16, 1024, 1 / 32)[0] == SpmmConfig("gather_t", 4, 32, 16, 4, 2, 1)
  assert _rest(16, 1024, 1 / 32)[1] == SpmmConfig("gather_t", 8, 64, 16, 8, 2, 1)
  assert _rest(16, 1024, 1 / 32)[2] == SpmmConfig("gather_t", 8, 64, 16, 8, 2, 4)
  assert _rest(12, 1024, 1 / 32)[0] == SpmmConfig("gather_t", 4, 32, 16, 4, 2, 1)
  assert _rest(16, 1024, 1 / 128)[0] == SpmmConfig("gather_t", 8, 64, 16, 8, 2, 1)
  assert _rest(16, 1024, 1 / 128)[1] == SpmmConfig("gather_t", 4, 32, 16, 4, 2, 1)
  assert _rest(197, 4096, 1 / 128)[0].variant == "dot"  # gather_t only up to 32
  assert _rest(197, 4096, 1 / 128)[3] == SpmmConfig("gather_t", 16, 8, 32, 4, 2, 1)
  assert _rest(197, 1024, 1 / 128)[3] == SpmmConfig("gather_t", 8, 16, 32, 4, 2, 1)
  assert _rest(197, 4096, 1 / 32)[0].variant == "dot"
  assert _rest(16, 1024, 1 / 128)[0].variant == "gather_t"
  assert _rest(197, 1024, 1 / 256)[0].variant == "gather_t"  # tokens * density < 1
  assert _rest(1, 4096, 1 / 128) == _rest(1, 4096)
  c = compress(jnp.ones((4096, 16)), 1, 128)
  assert _rest(16, 16, 1 / 128, 4096)[0] == SpmmConfig("gather", 16, 32, 1, 8, 2)  # whole rows


def test_whole_row_candidates():
  # With K known: C = K * density kept weights per output; one token per program and all C
  # columns of 2048 // C outputs (8 warps) and 1024 // C (4 warps, first for C < 32).
  assert _rest(4, 4096, 1 / 32, 1024)[:2] == (
    SpmmConfig("gather", 64, 32, 1, 8, 2),
    SpmmConfig("gather", 32, 32, 1, 4, 2),
  )
  assert _rest(4, 1024, 1 / 32, 4096)[0] == SpmmConfig("gather", 16, 128, 1, 8, 2)
  assert _rest(8, 4096, 1 / 128, 1024)[0] == SpmmConfig("gather", 128, 8, 1, 4, 2)
  assert _rest(8, 1024, 1 / 128, 4096)[0] == SpmmConfig("gather", 64, 32, 1, 8, 2)
  # They lead from 3 tokens on wide outputs, from 4 on narrow ones, up to 8 (to 16 while T*O*C
  # <= 2^20: ViT-L 1:128 and T5 1.1 base 1:32, not ViT-L 1:32) ...
  assert _rest(3, 4096, 1 / 32, 1024)[0].block_t == 1
  assert _rest(3, 1024, 1 / 32, 4096)[0] == SpmmConfig("gather", 2, 512, 4, 4, 2)
  assert _rest(3, 1024, 1 / 32, 4096)[-3] == SpmmConfig("gather_t", 4, 16, 4, 2, 2)
  assert _rest(16, 4096, 1 / 128, 1024)[0] == SpmmConfig("gather", 128, 8, 1, 4, 2)
  assert _rest(16, 4096, 1 / 32, 1024)[0] == _rest(16, 4096, 1 / 32)[0]
  assert _rest(16, 4096, 1 / 32, 1024)[-1] == SpmmConfig("gather", 32, 32, 1, 4, 2)
  assert _rest(16, 2048, 1 / 32, 768)[0] == SpmmConfig("gather", 32, 32, 1, 4, 2)
  assert _rest(16, 768, 1 / 32, 2048)[0] == SpmmConfig("gather", 32, 64, 1, 8, 2)
  assert _rest(12, 1024, 1 / 32, 4096)[0].variant == "gather_t"  # 1.5 * 2^20
  # ... and come last at one and two tokens; not for denser patterns nor past 16 tokens.
  assert _rest(1, 1024, 1 / 32, 4096)[0] == _rest(1, 1024, 1 / 32)[0]
  assert _rest(2, 4096, 1 / 128, 1024)[-1] == SpmmConfig("gather", 256, 8, 1, 8, 2)
  assert _rest(4, 4096, 1 / 16, 1024) == _rest(4, 4096, 1 / 16)
  assert _rest(32, 4096, 1 / 128, 1024) == _rest(32, 4096, 1 / 128)
  # Outputs at least 1 and at most O; steps of at most 1024 columns.
  assert _rest(4, 16, 1 / 128, 4096)[0] == SpmmConfig("gather", 16, 32, 1, 8, 2)
  assert _rest(4, 4096, 1 / 32, 1 << 20)[0] == SpmmConfig("gather", 2, 1024, 1, 8, 2)


def test_flat_candidates():
  flat = functools.partial(SpmmConfig, "gather", num_stages=2, flat=True)
  # Up to 64 tokens, wide outputs, 1:128 with a power-of-two row: flat whole rows of 2048
  # products first, then the outputs-on-lanes gather.
  for t in (1, 2, 16, 64):
    configs = candidate_configs(t, 4096, 1 / 128, 1024)
    assert configs[0] == flat(256, 8, 1, 8) and configs[1].outputs_on_lanes
  # Not without the row length, past 64 tokens, on narrow outputs, above 1/128, nor for rows of
  # six (T5's 768 inputs at 1:128: not one step).
  cases = [(1, 4096, 1 / 128), (65, 4096, 1 / 128, 1024), (1, 1024, 1 / 128, 4096)]
  cases += [(1, 4096, 1 / 64, 1024), (1, 2048, 1 / 128, 768), (16, 4096, 1 / 2, 1024)]
  for args in cases:
    assert not any(c.flat for c in candidate_configs(*args)), args
  # 2:4 on wide outputs: the flat 8 x 256 gather first.
  assert candidate_configs(1, 4096, 1 / 2, 1024)[0] == flat(8, 256, 1, 8)
  assert not any(c.flat for c in candidate_configs(1, 1024, 1 / 2, 4096))
  # The flag needs one token per program and the outputs off the lanes; other kernels drop it.
  c = compress(_nm_weight(jax.random.key(8), 256, 64, 2, 4, jnp.float32), 2, 4)
  with pytest.raises(ValueError, match="flat=True needs one token per program.*block_t=2"):
    _check_config(flat(8, 32, 2), c, 4)
  with pytest.raises(ValueError, match="outputs_on_lanes=True"):
    _check_config(flat(8, 32, 1, outputs_on_lanes=True), c, 1)
  assert not _check_config(SpmmConfig("dot", flat=True), c, 16).flat
  assert not _check_config(SpmmConfig("gather_t", flat=True), c, 16).flat
  # With one token a larger block_t clamps to 1, so the flag holds.
  assert _check_config(flat(8, 32, 4), c, 1) == flat(8, 32, 1)


def test_outputs_on_lanes_candidates():
  lanes = functools.partial(SpmmConfig, "gather", num_stages=2, outputs_on_lanes=True)
  # First from density 1/4 down, the tiling by density class, output width and tokens.
  assert candidate_configs(1, 4096, 1 / 4)[0] == lanes(4, 256, 1, 8)
  assert candidate_configs(4, 4096, 1 / 4)[0] == lanes(4, 256, 2, 4)
  assert candidate_configs(8, 1024, 1 / 4)[0] == lanes(4, 256, 2, 4)
  assert candidate_configs(2, 1024, 1 / 8)[0] == lanes(4, 512, 1, 8)
  assert candidate_configs(2, 4096, 1 / 8)[0] == lanes(4, 128, 2, 4)
  assert candidate_configs(16, 1024, 1 / 16)[0] == lanes(16, 128, 2, 4)
  assert candidate_configs(4, 1024, 1 / 32, 4096)[0] == lanes(8, 128, 1, 4)
  assert candidate_configs(16, 1024, 1 / 32)[0] == lanes(16, 128, 2, 8)
  assert candidate_configs(32, 4096, 1 / 32)[0] == lanes(64, 32, 2, 8)
  assert candidate_configs(8, 4096, 1 / 128)[0] == lanes(32, 8, 1, 4)
  assert candidate_configs(197, 4096, 1 / 128)[0] == lanes(256, 8, 2, 8)
  assert candidate_configs(197, 1024, 1 / 256)[0] == lanes(128, 32, 2, 8)
  # Not for 2:4, unknown densities, nor past the token counts where it led.
  for args in ((1, 4096, 1 / 2), (4, 4096), (16, 4096, 1 / 4), (16, 1024, 1 / 8),
               (32, 4096, 1 / 16), (33, 1024, 1 / 32), (257, 4096, 1 / 128)):  # fmt: skip
    assert not any(c.outputs_on_lanes for c in candidate_configs(*args)), args
  # default_config takes it; the kernel clamps its step to the row (C = 1024/32 = 32 columns).
  c = compress(_nm_weight(jax.random.key(6), 1024, 64, 1, 32, jnp.float32), 1, 32)
  assert default_config(4, c) == lanes(8, 128, 1, 4)
  # The flag means nothing to the other kernels: the clamp clears it.
  assert not _check_config(SpmmConfig("dot", outputs_on_lanes=True), c, 16).outputs_on_lanes
  assert _check_config(lanes(8, 128, 1, 4), c, 4) == lanes(8, 32, 1, 4)
  # A row of 24 columns: capped at 32 (the last step masked), where other gathers take 8.
  c = compress(_nm_weight(jax.random.key(7), 768, 64, 1, 32, jnp.float32), 1, 32)
  assert _check_config(lanes(16, 128, 1, 4), c, 4).block_k == 32
  assert _check_config(SpmmConfig("gather", 16, 128, 1), c, 4).block_k == 8


def test_default_config_skips_candidates_that_do_not_apply():
  # 3:6 at one token on wide outputs: "select" comes second for density 1/2 but needs whole
  # groups per (power-of-two) step; at 8 and 16 tokens the tensor-core kernels need m a power
  # of two.
  w = _nm_weight(jax.random.key(4), 96, 2048, 3, 6, jnp.float32)
  c = compress(w, 3, 6)
  select = candidate_configs(1, 2048, 1 / 2)[1]
  assert select.variant == "select"
  with pytest.raises(ValueError, match="'select' N:M kernel needs n=3 to divide a step"):
    _check_config(select, c, 1)
  for tokens, variant in ((1, "gather"), (8, "gather"), (16, "gather")):
    config = default_config(tokens, c)
    assert config.variant == variant, (tokens, config)
  x = jax.random.normal(jax.random.key(5), (8, 96))
  assert _relerr(nm_matmul(x, c, interpret=True), w, x) < 1e-5
  with pytest.raises(ValueError, match="'dot' N:M kernel needs m a power of two"):
    nm_matmul(x, c, config=candidate_configs(8, 2048, 1 / 2)[0], interpret=True)


def test_nm_matmul_errors():
  c = compress(jnp.ones((16, 4)), 1, 4)
  with pytest.raises(ValueError, match="last axis must be K=16"):
    nm_matmul(jnp.ones((2, 8)), c, interpret=True)
  with pytest.raises(ValueError, match="variant='wide'"):
    nm_matmul(jnp.ones((2, 16)), c, config=SpmmConfig("wide"), interpret=True)
  with pytest.raises(ValueError, match="block_out=12 is not a power of two"):
    nm_matmul(jnp.ones((2, 16)), c, config=SpmmConfig("gather", 12), interpret=True)
  with pytest.raises(ValueError, match="needs m a power of two, got m=6"):
    nm_matmul(jnp.ones((2, 12)), compress(jnp.ones((12, 4)), 1, 6), config=SpmmConfig("dot"))
  three_of_six = compress(jnp.ones((96, 8)), 3, 6)  # 48 kept per output: steps of 16
  with pytest.raises(ValueError, match="'select' N:M kernel needs n=3 to divide a step of 16"):
    nm_matmul(jnp.ones((1, 96)), three_of_six, config=SpmmConfig("select", 4, 64), interpret=True)


def _tied(key, shape, dtype):
  """Values on a coarse grid: many exact ties, zeros and both signs."""
  return (jnp.round(jax.random.normal(key, shape) * 2) / 2).astype(dtype)


MASKS = [
  ((16, 24), 0, 2, 4, jnp.float32),
  ((256, 12), 0, 16, 128, jnp.float32),
  ((256, 40), 0, 16, 128, jnp.bfloat16),
  ((128, 64), 0, 100, 128, jnp.float16),  # 8 chunks of 16 x 16 words (two columns each)
  ((6, 64, 3), (0, 1), 3, 8, jnp.float32),
  ((7, 32), 1, 1, 8, jnp.bfloat16),
  ((5, 64, 4), 1, 5, 16, jnp.float16),
  ((128, 8), 0, 127, 128, jnp.float32),
  ((512, 4), 0, 16, 256, jnp.float32),  # 8 chunks of 32
  ((1024, 2), 0, 3, 1024, jnp.bfloat16),  # 32 chunks of 32, the largest group
]


@pytest.mark.parametrize("shape, axis, n, m, dtype", MASKS)
def test_mask_kernel_interpret_matches_numpy(shape, axis, n, m, dtype, nm_reference):
  for x in (_tied(jax.random.key(0), shape, dtype), jax.random.normal(jax.random.key(1), shape)):
    x = x.astype(dtype)
    got = nm_mask_pallas(x, n, m, axis=axis, interpret=True)
    assert got.dtype == jnp.bool_ and got.shape == shape
    np.testing.assert_array_equal(np.asarray(got), nm_reference(x.astype(jnp.float32), n, m, axis))


def test_mask_kernel_tilings_and_special_values(nm_reference):
  x = jax.random.normal(jax.random.key(2), (64, 20)).at[0, 0].set(jnp.inf).at[5, 3].set(-0.0)
  # Defaults: whole float32 groups per thread up to m = 32, chunks for larger groups.
  assert default_mask_config(32) == MaskConfig(32, 32, early_stop=True)
  assert default_mask_config(128) == MaskConfig(32, 8, early_stop=True)
  assert default_mask_config(32, jnp.bfloat16) == MaskConfig(16, 64, packed=True)
  assert default_mask_config(128, jnp.float16) == MaskConfig(32, 32)
  assert default_mask_config(128, jnp.bfloat16, n=16) == MaskConfig(
    16, 32, packed=True, order_bounds=True
  )
  assert default_mask_config(32, jnp.bfloat16, n=4) == MaskConfig(
    16, 64, packed=True, order_bounds=True
  )
  # Whole small groups per thread, wide programs; the n-th largest in-thread where n <= 8.
  assert default_mask_config(4, jnp.bfloat16, n=2) == MaskConfig(4, 256, order_bounds=True)
  assert default_mask_config(8, jnp.float16, n=1) == MaskConfig(8, 128)
  assert default_mask_config(4, jnp.float32, n=2) == MaskConfig(4, 256, True, order_bounds=True)
  assert default_mask_config(32, jnp.float32, n=4) == MaskConfig(32, 32, True, order_bounds=True)
  assert default_mask_config(32, jnp.float32, n=16) == MaskConfig(32, 32, early_stop=True)
  assert default_mask_config(128, jnp.bfloat16, n=1) == MaskConfig(32, 32)
  assert default_mask_config(256, jnp.bfloat16, n=16) == MaskConfig(32, 32)
  assert default_mask_config(128, jnp.float32, n=16) == MaskConfig(32, 8, early_stop=True)
  configs = (None, MaskConfig(), MaskConfig(4, 8), MaskConfig(8, 64, True), MaskConfig(1, 1))
  for config in configs:  # 20 columns: blocks of 4; 1 to 32 elements of a group per thread
    got = nm_mask_pallas(x, 3, 32, axis=0, interpret=True, config=config)
    np.testing.assert_array_equal(np.asarray(got), nm_reference(x, 3, 32, 0))
  # Groups the bisection resolves early (distinct magnitudes) beside groups that need every bit
  # (ties at the n-th largest), and all-equal groups, with and without the early stop.
  normal = jax.random.normal(jax.random.key(3), (128, 5))
  tied = _tied(jax.random.key(4), (128, 5), jnp.float32)
  mixed = jnp.concatenate([normal, tied, jnp.full((128, 2), 0.5)], axis=1)
  for (n, m), early in itertools.product(((16, 128), (5, 64), (63, 64)), (False, True)):
    config = MaskConfig(8, 4, early)  # chunks x 4 columns
    got = nm_mask_pallas(mixed, n, m, axis=0, interpret=True, config=config)
    np.testing.assert_array_equal(np.asarray(got), nm_reference(mixed, n, m, 0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_kernel_lower_bound_at_the_threshold(dtype, nm_reference):
  # The bisection starts from the largest minimum over parts of >= n elements. Put a group's n
  # largest magnitudes in its first rows (one part), so that this bound is the n-th largest
  # itself, with a tie at it further down the group; with and without the early stop.
  base = jax.random.uniform(jax.random.key(10), (64, 6), minval=0.1, maxval=1.0)
  for n in (2, 4, 8, 16):
    top = 2.0 + jnp.arange(n, 0, -1, dtype=jnp.float32)[:, None] * jnp.ones((1, 6))
    x = base.at[:n].set(top).at[n + 3].set(top[n - 1]).at[32 + n + 1].set(-top[n - 1])
    x = x.astype(dtype)
    for config in (MaskConfig(32, 2), MaskConfig(32, 2, True), MaskConfig(8, 2, True)):
      got = nm_mask_pallas(x, n, 32, axis=0, interpret=True, config=config)
      want = nm_reference(x.astype(jnp.float32), n, 32, 0)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{n}:32 {config}")


def test_rth_largest_and_order_bounds_match_numpy():
  # The merge tree's r-th largest of a thread's elements, and the group bounds built from them,
  # against NumPy: ties (a coarse grid), r from 1 to all of the elements.
  rng = np.random.default_rng(0)
  for size, r in ((1, 1), (2, 2), (5, 3), (8, 4), (16, 2), (16, 8), (32, 8)):
    keys = rng.integers(0, 6, (size, 3, 7)).astype(np.int32)
    got = _masks._rth_largest([jnp.asarray(k) for k in keys], r)
    np.testing.assert_array_equal(np.asarray(got), -np.sort(-keys, axis=0)[r - 1])
  for (n, m), chunks in itertools.product(((1, 8), (3, 8), (4, 8), (2, 32), (16, 128), (63, 64),
                                           (9, 16), (16, 32)), (1, 2, 4, 8)):  # fmt: skip
    if m % chunks:
      continue
    group = rng.integers(0, 40, (m, 5)).astype(np.int32)  # element q*sub + i: chunk q, array i
    sub = m // chunks
    keys = [jnp.asarray(group[i::sub]) for i in range(sub)]
    lo, hi, exact = _masks._order_bounds(keys, n, chunks)
    nth = -np.sort(-group, axis=0)[n - 1]
    assert np.all(np.asarray(lo)[0] <= nth) and np.all(nth <= np.asarray(hi)[0]), (n, m, chunks)
    assert exact == (chunks == 1 and n <= _masks._MAX_ORDER)
    if exact:
      np.testing.assert_array_equal(np.asarray(lo)[0], nth)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_kernel_order_bounds(dtype, nm_reference):
  # Bisection from the parts' order statistics, with and without the early stop and packed
  # words, on tied values, all-equal columns and normally distributed ones; whole groups per
  # thread (exact: no bisection) and chunks.
  normal = jax.random.normal(jax.random.key(13), (128, 8))
  tied = _tied(jax.random.key(14), (128, 8), jnp.float32)
  x = jnp.concatenate([normal, tied, jnp.full((128, 2), 0.5)], axis=1).astype(dtype)
  patterns = ((2, 8), (4, 8), (8, 16), (2, 32), (16, 32), (8, 64), (16, 128), (100, 128))
  configs = (MaskConfig(16, 32, order_bounds=True), MaskConfig(8, 4, True, order_bounds=True),
             MaskConfig(16, 32, packed=True, order_bounds=True),
             MaskConfig(128, 2, order_bounds=True))  # fmt: skip
  for (n, m), config in itertools.product(patterns, configs):
    got = nm_mask_pallas(x, n, m, axis=0, interpret=True, config=config)
    want = nm_reference(x.astype(jnp.float32), n, m, 0)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{n}:{m} {config}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_mask_kernel_packed_columns(dtype, nm_reference):
  # Two columns per 32-bit word: both halves' groups, ties, infinities, signed zeros, and a NaN
  # (above infinity) must come out as with one column per thread.
  x = _tied(jax.random.key(8), (128, 24), dtype)
  x = x.at[0, 0].set(jnp.inf).at[1, 1].set(-jnp.inf).at[2, 2].set(-0.0).at[3, 3].set(jnp.nan)
  x = x.at[:, 5].set(0.25)  # an all-equal column beside a normal one in the same word
  configs = (MaskConfig(16, 32, packed=True), MaskConfig(8, 4, packed=True),
             MaskConfig(32, 2, packed=True), MaskConfig(4, 8, True, packed=True))  # fmt: skip
  for (n, m), config in itertools.product(((1, 32), (3, 32), (16, 64), (63, 64), (2, 8)), configs):
    got = nm_mask_pallas(x, n, m, axis=0, interpret=True, config=config)
    want = jax.jit(lambda v, n=n, m=m: nm_mask(v, n, m, axis=0))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{n}:{m} {config}")
  finite = x.at[3, 3].set(1.0)
  for n, m in ((3, 32), (16, 64)):
    got = nm_mask_pallas(finite, n, m, axis=0, interpret=True)
    want = nm_reference(finite.astype(jnp.float32), n, m, 0)
    np.testing.assert_array_equal(np.asarray(got), want)
  # An odd number of columns (or one column per program) falls back to one column per thread.
  odd = _tied(jax.random.key(9), (64, 7), dtype)
  for config in (MaskConfig(16, 32, packed=True), MaskConfig(16, 1, packed=True)):
    got = nm_mask_pallas(odd, 5, 32, axis=0, interpret=True, config=config)
    np.testing.assert_array_equal(np.asarray(got), nm_reference(odd.astype(jnp.float32), 5, 32, 0))


def test_mask_kernel_under_vmap_and_jit():
  x = _tied(jax.random.key(5), (3, 64, 8), jnp.bfloat16)  # a batch of 3 (64, 8) kernels
  for n, m in ((3, 32), (16, 64)):
    got = jax.jit(jax.vmap(lambda v, n=n, m=m: nm_mask_pallas(v, n, m, interpret=True)))(x)
    want = jax.vmap(lambda v, n=n, m=m: nm_mask(v, n, m, axis=0))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_mask_kernel_has_no_gradient():
  grad = jax.grad(lambda w: jnp.sum(jnp.where(nm_mask_pallas(w, 1, 4, interpret=True), w, 0.0)))
  np.testing.assert_array_equal(
    np.asarray(grad(jnp.arange(8.0).reshape(4, 2))), [[0, 0]] * 3 + [[1, 1]]
  )


def test_mask_kernel_errors(nm_reference):
  with pytest.raises(ValueError, match="m a power of two <= 1024; got dtype float32, m=6"):
    nm_mask_pallas(jnp.ones((12, 2)), 3, 6)
  with pytest.raises(ValueError, match="got dtype int32"):
    nm_mask_pallas(jnp.ones((8, 2), jnp.int32), 1, 4)
  with pytest.raises(ValueError, match="not divisible by m=8"):
    nm_mask_pallas(jnp.ones((12, 2)), 1, 8)
  with pytest.raises(ValueError, match="m a power of two <= 1024; got dtype float32, m=2048"):
    nm_mask_pallas(jnp.ones((2048, 2)), 1, 2048)
  with pytest.raises(ValueError, match=r"MaskConfig.sub=3 is not a power of two"):
    nm_mask_pallas(jnp.ones((8, 2)), 1, 8, config=MaskConfig(sub=3), interpret=True)
  with pytest.raises(ValueError, match=r"m=1024: 64 chunks x 32 columns = 2048 threads"):
    nm_mask_pallas(jnp.ones((1024, 64)), 1, 1024, config=MaskConfig(16, 32), interpret=True)
  # Packed, a thread holds two columns: 32 chunks x 64 columns is 1024 threads of 32 words, which
  # fits; one column per thread (float32, or 128 packed columns) does not.
  wide_group = _tied(jax.random.key(11), (512, 64), jnp.bfloat16)
  packed = MaskConfig(16, 64, packed=True)
  got = nm_mask_pallas(wide_group, 100, 512, interpret=True, config=packed)
  np.testing.assert_array_equal(
    np.asarray(got), nm_reference(wide_group.astype(jnp.float32), 100, 512, 0)
  )
  with pytest.raises(ValueError, match=r"m=512: 32 chunks x 64 columns = 2048 threads"):
    nm_mask_pallas(wide_group.astype(jnp.float32), 100, 512, interpret=True, config=packed)
  too_wide = MaskConfig(16, 128, packed=True)
  with pytest.raises(ValueError, match=r"32 chunks x 64 words of two columns = 2048 threads"):
    nm_mask_pallas(jnp.ones((512, 128), jnp.bfloat16), 1, 512, interpret=True, config=too_wide)
  wide = jax.ShapeDtypeStruct((8, 65536 * 8), jnp.float32)  # traced only, never allocated
  with pytest.raises(ValueError, match="524288 columns in blocks of 4: 131072 column blocks"):
    jax.eval_shape(lambda v: nm_mask_pallas(v, 1, 8, config=MaskConfig(8, 4), interpret=True), wide)
  assert jax.eval_shape(lambda v: nm_mask_pallas(v, 1, 8, interpret=True), wide).shape == wide.shape
  wide16 = jax.ShapeDtypeStruct((64, 65536 * 8), jnp.bfloat16)
  small = MaskConfig(16, 8, packed=True)  # blocks of 8 columns (4 words)
  with pytest.raises(ValueError, match="524288 columns in blocks of 8: 65536 column blocks"):
    jax.eval_shape(lambda v: nm_mask_pallas(v, 1, 64, interpret=True, config=small), wide16)
  # The default, 64 columns per block, fits the grid.
  out = jax.eval_shape(lambda v: nm_mask_pallas(v, 1, 64, interpret=True), wide16)
  assert out.shape == wide16.shape


def test_use_mask_kernel_policy(monkeypatch):
  x, x16 = jnp.ones((128, 4)), jnp.ones((128, 4), jnp.bfloat16)
  monkeypatch.delenv(MASK_KERNEL_ENV, raising=False)
  assert not use_mask_kernel(x, 16, 128, (0,))  # opt-in
  monkeypatch.setenv(MASK_KERNEL_ENV, "auto")
  assert use_mask_kernel(x, 16, 128, (0,)) and use_mask_kernel(x16, 8, 64, (0,))
  assert use_mask_kernel(x, 2, 32, (0,)) and use_mask_kernel(x16, 31, 32, (0,))
  assert use_mask_kernel(x, 4, 8, (0,)) and use_mask_kernel(x16, 3, 16, (0,))
  assert use_mask_kernel(x, 1, 4, (0,)) and use_mask_kernel(x16, 1, 128, (0,))
  assert use_mask_kernel(x, 2, 4, (0,)) and use_mask_kernel(x16, 3, 4, (0,))
  assert use_mask_kernel(x, 1, 2, (0,))
  assert not use_mask_kernel(jnp.ones((96, 4)), 16, 96, (0,))  # m not a power of two
  assert not use_mask_kernel(jnp.ones((2048, 4)), 16, 2048, (0,))  # m above 1024
  wide = jax.ShapeDtypeStruct((8, 65536 * 256), jnp.float32)  # 131072 blocks of 128 columns
  assert not use_mask_kernel(wide, 1, 8, (0,)) and use_mask_kernel(wide, 1, 8, (1,))
  assert mask_kernel_applies(wide, 1, 8, (0,))  # nm_mask_pallas takes it with a larger block
  monkeypatch.setenv(MASK_KERNEL_ENV, "1")
  assert use_mask_kernel(x, 2, 4, (0,))
  monkeypatch.setenv(MASK_KERNEL_ENV, "0")
  assert not use_mask_kernel(x, 16, 128, (0,))


@needs_gpu
@pytest.mark.parametrize("t", [1, 3, 8, 16, 197])
@pytest.mark.parametrize(
  "n, m, o",
  [
    (2, 4, 512),
    (1, 4, 4096),
    (1, 8, 512),
    (1, 16, 512),
    (1, 32, 4096),
    (1, 128, 512),
    (1, 8, 4096),
    (2, 4, 4096),
    (1, 128, 4096),
  ],
)
def test_nm_matmul_on_gpu(t, n, m, o):
  _every_candidate_on_gpu(1024, o, n, m, t)


def _every_candidate_on_gpu(k, o, n, m, t):
  """Every candidate configuration for the case, compiled, against float64 (bfloat16 operands)."""
  w = _nm_weight(jax.random.key(t + k), k, o, n, m, jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (t, k), jnp.float32).astype(jnp.bfloat16)
  c = compress(w, n, m)
  for config in candidate_configs(t, o, n / m, k):
    y = jax.jit(lambda x, c, config=config: nm_matmul(x, c, config=config))(x, c)
    err = _relerr(y.astype(jnp.float32), w.astype(jnp.float32), x.astype(jnp.float32))
    assert err < 1e-2, config


@needs_gpu
@pytest.mark.parametrize("t", [32, 64])
def test_nm_matmul_on_gpu_flat_rows_at_many_tokens(t):
  """1:128 on 4096 outputs at 32 and 64 tokens: flat whole rows, one token per program."""
  assert candidate_configs(t, 4096, 1 / 128, 1024)[0].flat
  _every_candidate_on_gpu(1024, 4096, 1, 128, t)


@needs_gpu
@pytest.mark.parametrize("t", [1, 4, 16, 197])
@pytest.mark.parametrize("n, m, o", [(1, 8, 2048), (1, 32, 2048), (1, 128, 512), (2, 4, 2048)])
def test_nm_matmul_on_gpu_rows_of_three_times_a_power_of_two(t, n, m, o):
  """K = 768 (T5 1.1 base): 96, 24 and 6 kept weights per row, the outputs-on-lanes steps
  masked past the row."""
  _every_candidate_on_gpu(768, o, n, m, t)


@needs_gpu
@pytest.mark.parametrize(
  "config",
  [
    SpmmConfig("dot", 32, 64, 16),
    SpmmConfig("dot_gather", 16, 64, 16),
    SpmmConfig("dot", 32, 64, 16, tokens_in_m=True),
    SpmmConfig("gather_t", 8, 8, 16),
    SpmmConfig("gather", 16, 32, 2, outputs_on_lanes=True),
    SpmmConfig("gather", 8, 32, 1, flat=True),
  ],
)
def test_nm_matmul_float32_on_gpu(config):
  """Float32 operands get float32 products (the dot kernel asks for full precision, not TF32)."""
  w = _nm_weight(jax.random.key(3), 256, 64, 1, 4, jnp.float32)
  x = jax.random.normal(jax.random.key(4), (19, 256), jnp.float32)
  y = jax.jit(lambda x, c: nm_matmul(x, c, config=config))(x, compress(w, 1, 4))
  assert y.dtype == jnp.float32 and _relerr(y, w, x) < 1e-5


@needs_gpu
@pytest.mark.parametrize("n, m", [(16, 128), (8, 64), (1, 8), (2, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_kernel_on_gpu_matches_xla(n, m, dtype, monkeypatch):
  x = _tied(jax.random.key(3), (768, 512), dtype)
  monkeypatch.setenv(MASK_KERNEL_ENV, "0")
  xla = jax.jit(lambda v: nm_mask(v, n, m, axis=0))(x)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(lambda v: nm_mask_pallas(v, n, m))(x)), np.asarray(xla)
  )
  monkeypatch.delenv(MASK_KERNEL_ENV)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(lambda v: nm_mask(v, n, m, axis=0))(x)), np.asarray(xla)
  )


@needs_gpu
@pytest.mark.parametrize("shape, n, m", [((512, 96), 16, 256), ((1024, 40), 3, 1024)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_kernel_on_gpu_large_groups(shape, n, m, dtype, nm_reference):
  x = _tied(jax.random.key(6), shape, dtype)  # 8 and 32 chunks of 32 per group
  got = jax.jit(lambda v: nm_mask_pallas(v, n, m))(x)
  np.testing.assert_array_equal(np.asarray(got), nm_reference(x.astype(jnp.float32), n, m, 0))


@needs_gpu
def test_mask_kernel_on_gpu_packed_program_of_1024_threads(nm_reference):
  x = _tied(jax.random.key(12), (512, 192), jnp.bfloat16)  # 32 chunks x 32 words per program
  config = MaskConfig(16, 64, packed=True)
  for n in (1, 100):
    got = jax.jit(lambda v, n=n: nm_mask_pallas(v, n, 512, config=config))(x)
    np.testing.assert_array_equal(np.asarray(got), nm_reference(x.astype(jnp.float32), n, 512, 0))


@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_kernel_on_gpu_order_bounds(dtype, nm_reference):
  # Compiled: the bisection from the parts' order statistics, whole groups per thread (no
  # bisection) and chunks, on normally distributed and on tied values (side by side).
  normal = jax.random.normal(jax.random.key(15), (256, 32))
  tied = _tied(jax.random.key(16), (256, 32), jnp.float32)
  x = jnp.concatenate([normal, tied], axis=1).astype(dtype)
  for n, m in ((4, 8), (2, 32), (8, 64), (16, 128), (100, 256)):
    base = default_mask_config(m, dtype, n)._replace(order_bounds=True)
    configs = {base, base._replace(early_stop=False), MaskConfig(32, 16, order_bounds=True)}
    for config in configs:
      got = jax.jit(lambda v, c=config, n=n, m=m: nm_mask_pallas(v, n, m, config=c))(x)
      want = nm_reference(x.astype(jnp.float32), n, m, 0)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{n}:{m} {config}")


@needs_gpu
def test_mask_kernel_on_gpu_under_vmap():
  x = _tied(jax.random.key(7), (3, 256, 64), jnp.bfloat16)
  for n, m in ((3, 32), (16, 128), (1, 8)):
    got = jax.jit(jax.vmap(lambda v, n=n, m=m: nm_mask_pallas(v, n, m)))(x)
    want = jax.vmap(lambda v, n=n, m=m: nm_mask(v, n, m, axis=0))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_without_pallas_triton_the_package_works_and_kernels_say_why():
  # A JAX without Pallas's Triton backend (deprecated in JAX 0.11): everything but the kernels
  # works, "auto" falls back to XLA, and a kernel call names what is missing.
  script = textwrap.dedent("""
    import os, sys
    sys.modules["jax.experimental.pallas.triton"] = None  # its import now raises ImportError
    import jax.numpy as jnp
    import numpy as np
    from nm_sparse_jax import nm_mask, sparse_linear
    from nm_sparse_jax.bench import spmm
    from nm_sparse_jax.export import compress
    from nm_sparse_jax.kernels import candidate_configs, nm_mask_pallas, nm_matmul, use_mask_kernel
    from nm_sparse_jax.kernels._backend import available
    assert not available()
    x = jnp.arange(32.0).reshape(8, 4)
    os.environ["NM_SPARSE_JAX_MASK_KERNEL"] = "auto"
    assert not use_mask_kernel(x, 1, 8, (0,))
    os.environ["NM_SPARSE_JAX_MASK_KERNEL"] = "1"
    assert use_mask_kernel(x, 1, 8, (0,))  # asked for: the call below raises
    assert np.asarray(nm_mask(x, 1, 8)).sum() == 4
    assert candidate_configs(16, 4096, 1 / 8)
    c = compress(jnp.eye(4), 1, 2)
    for call in (lambda: nm_matmul(jnp.ones((1, 4)), c), lambda: nm_mask_pallas(x, 1, 8),
                 lambda: sparse_linear.linear(jnp.ones((1, 4)), c)):
      try:
        call()
      except ImportError as error:
        print("ImportError:", error)
      else:
        raise SystemExit("no ImportError")
    try:
      spmm.main(["--paths", "nm", "--shapes", "8x8"])
    except SystemExit as exit:
      print("exit", exit.code)
  """)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  errors = [line for line in done.stdout.splitlines() if line.startswith("ImportError:")]
  assert len(errors) == 3
  assert "nm_matmul needs Pallas's Triton backend (jax.experimental.pallas.triton)" in errors[0]
  assert "nm_mask_pallas needs Pallas's Triton backend" in errors[1]
  assert "nm_matmul needs" in errors[2]  # sparse_linear's nm path
  assert "exit 2" in done.stdout
  assert "--paths nm: the N:M kernels need Pallas's Triton backend" in done.stderr

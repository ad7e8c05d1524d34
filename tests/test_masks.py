"""nm_mask, parse_nm and contraction_axes against a NumPy reference and hand-computed cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import NM, nm_mask, parse_nm
from nm_sparse_jax._masks import contraction_axes

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16

# (shape, axis, n, m, dtype). Between them: ranks 1-4; positive, negative and multi-axis
# contraction axes; every selection path of nm_mask: n = 1, n = m - 1, m <= 16 with
# 2 <= n <= m - 2, and larger m with general n (up to 32 passes unrolled, above that in a loop,
# both counting up from the largest and down from the smallest).
CASES = [
  ((8,), 0, 1, 2, F32),
  ((12, 3), 0, 1, 4, BF16),
  ((5, 16), -1, 3, 4, F16),
  ((16, 2, 3), 0, 2, 4, F32),
  ((3, 24, 2), 1, 1, 8, F32),
  ((2, 3, 4, 16), -1, 7, 8, BF16),
  ((4, 8, 6), (0, 1), 2, 8, F32),  # attention out kernel (heads, head_dim, embed)
  ((4, 8, 6), (0, 1), 4, 8, F16),
  ((3, 4, 4, 2), (1, 2), 5, 8, F32),
  ((2, 2, 8, 3), 2, 3, 8, F16),
  ((32, 3), 0, 3, 16, BF16),
  ((2, 16, 3), -2, 8, 16, F32),
  ((4, 4, 5), (-3, -2), 13, 16, F32),
  ((64, 2), 0, 1, 32, F16),
  ((2, 32), 1, 31, 32, F32),
  ((96, 2), 0, 2, 32, BF16),
  ((4, 8, 3), (0, 1), 16, 32, F32),
  ((3, 64), -1, 20, 32, F32),
  ((96, 2), 0, 32, 96, F32),
  ((2, 96), 1, 33, 96, F16),
  ((128, 3), 0, 40, 128, F32),
  ((2, 128, 2), 1, 100, 128, BF16),
  ((8, 16, 2), (0, 1), 64, 128, F32),
  ((128, 2), 0, 1, 128, F32),
  ((2, 1, 256), -1, 127, 128, F16),
  ((2048, 2), 0, 5, 2048, F32),
  ((2, 2048), 1, 1000, 2048, BF16),
  ((4096,), 0, 1500, 2048, F32),
]


def _case_id(case):
  shape, axis, n, m, dtype = case
  return f"{n}:{m}-{'x'.join(map(str, shape))}-axis{axis}-{jnp.dtype(dtype).name}"


def _inputs(shape, dtype, seed=0):
  """Random normal values, and inputs full of ties: small integers, zeros, +-0.0, repeats."""
  rng = np.random.default_rng(seed)
  signed_zeros = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
  return {
    "normal": rng.normal(size=shape),
    "small_integers": rng.integers(-3, 4, size=shape).astype(np.float64),
    "zeros": np.zeros(shape),
    "signed_zeros": signed_zeros,
    "repeated": rng.choice([-1.5, 1.5, 0.25], size=shape),
  }


def _check(mask, x, n, m, axis, nm_reference, group_counts):
  mask = np.asarray(mask)
  assert mask.dtype == np.bool_ and mask.shape == x.shape
  np.testing.assert_array_equal(mask, nm_reference(x, n, m, axis))
  assert (group_counts(mask, m, axis) == n).all()


_jit_nm_mask = jax.jit(nm_mask, static_argnames=("n", "m", "axis"))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nm_mask_matches_reference_jitted(case, nm_reference, group_counts):
  shape, axis, n, m, dtype = case
  for name, values in _inputs(shape, dtype).items():
    x = jnp.asarray(values, dtype)
    mask = _jit_nm_mask(x, n=n, m=m, axis=axis)
    try:
      _check(mask, x, n, m, axis, nm_reference, group_counts)
    except AssertionError as e:
      raise AssertionError(f"input {name}: {e}") from None


@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[12], CASES[20]], ids=_case_id)
def test_nm_mask_matches_reference_eager(case, nm_reference, group_counts):
  shape, axis, n, m, dtype = case
  for values in _inputs(shape, dtype, seed=1).values():
    x = jnp.asarray(values, dtype)
    _check(nm_mask(x, n, m, axis=axis), x, n, m, axis, nm_reference, group_counts)


def test_nm_mask_random_shapes(nm_reference, group_counts):
  rng = np.random.default_rng(2024)
  patterns = [(1, 4), (2, 4), (3, 4), (1, 8), (3, 8), (2, 16), (6, 32), (45, 64)]
  dtypes = [F32, BF16, F16]
  for i, (n, m) in enumerate(patterns):
    ndim = 1 + i % 4
    shape = [int(s) for s in rng.integers(1, 4, size=ndim)]
    first = int(rng.integers(0, ndim))
    if ndim >= 3 and i % 2:  # two adjacent contraction axes
      axis = (first - 1, first) if first else (0, 1)
      shape[axis[0]] = m // 2 * int(rng.integers(1, 3))
      shape[axis[1]] = 2
    else:
      axis = first - ndim if i % 3 == 0 else first
      shape[axis] = m * int(rng.integers(1, 4))
    dtype = dtypes[i % 3]
    x = jnp.asarray(rng.normal(size=shape), dtype)
    _check(nm_mask(x, n, m, axis=axis), x, n, m, axis, nm_reference, group_counts)


def test_nm_mask_hand_computed():
  w = jnp.array([[0.1, -3.0], [2.0, 0.5], [-0.2, 0.4], [1.0, 0.0]])  # (in=4, out=2)
  expected = [[False, True], [True, True], [False, False], [True, False]]
  np.testing.assert_array_equal(nm_mask(w, 2, 4, axis=0), expected)
  np.testing.assert_array_equal(nm_mask(w.T, 2, 4, axis=1), np.transpose(expected))
  # Ties keep the lower index, whatever the sign; -0.0 ties with 0.0.
  np.testing.assert_array_equal(
    nm_mask(jnp.array([-2.0, 2.0, 2.0, -2.0]), 2, 4), [True, True, False, False]
  )
  np.testing.assert_array_equal(
    nm_mask(jnp.array([-0.0, 0.0, -0.0, 0.0]), 1, 4), [True, False, False, False]
  )
  np.testing.assert_array_equal(
    nm_mask(jnp.array([0.0, 1.0, -1.0, 0.0]), 3, 4), [True, True, True, False]
  )
  # NaN counts as larger than infinity; +-inf tie.
  x = jnp.array([1.0, -jnp.inf, jnp.nan, jnp.inf])
  np.testing.assert_array_equal(nm_mask(x, 2, 4), [False, True, True, False])
  np.testing.assert_array_equal(_jit_nm_mask(x, n=1, m=4), [False, False, True, False])


def test_nm_mask_multi_axis_is_row_major_over_the_axes():
  # An attention out kernel (heads=2, head_dim=2, embed=1): the group along axes (0, 1) is
  # [k[0, 0], k[0, 1], k[1, 0], k[1, 1]] = [1, 4, 3, 2].
  k = jnp.array([[[1.0], [4.0]], [[3.0], [2.0]]])
  np.testing.assert_array_equal(
    nm_mask(k, 2, 4, axis=(0, 1))[..., 0], [[False, True], [True, False]]
  )
  np.testing.assert_array_equal(
    nm_mask(k, 1, 2, axis=(0, 1))[..., 0], [[False, True], [True, False]]
  )
  np.testing.assert_array_equal(
    nm_mask(k, 1, 4, axis=(1, 0))[..., 0], [[False, True], [False, False]]
  )
  # Heads never mix when the group is one head: axis 1 alone.
  np.testing.assert_array_equal(nm_mask(k, 1, 2, axis=1)[..., 0], [[False, True], [True, False]])


@pytest.mark.parametrize(
  ("n", "m", "axis", "in_axes"),
  [(2, 4, 0, 0), (1, 8, -1, 1), (3, 8, (0, 1), 2)],
)
def test_nm_mask_under_vmap(n, m, axis, in_axes, nm_reference, group_counts):
  shape = {0: (3, 16, 4), 1: (4, 3, 16), 2: (2, 4, 3, 5)}[in_axes]
  x = jnp.asarray(np.random.default_rng(3).normal(size=shape), F32)
  masks = jax.vmap(functools.partial(nm_mask, n=n, m=m, axis=axis), in_axes=in_axes)(x)
  masks = np.moveaxis(np.asarray(masks), 0, in_axes)
  for b in range(x.shape[in_axes]):
    xb = np.take(np.asarray(x), b, axis=in_axes)
    _check(np.take(masks, b, axis=in_axes), xb, n, m, axis, nm_reference, group_counts)


def test_nm_mask_accepts_numpy_and_jit_traces_once_per_shape():
  traces = 0

  @jax.jit
  def f(x):
    nonlocal traces
    traces += 1
    return nm_mask(x, 2, 4)

  rng = np.random.default_rng(4)
  for _ in range(3):
    x = rng.normal(size=(8, 3)).astype(np.float32)
    np.testing.assert_array_equal(f(x), nm_mask(x, 2, 4))
  assert traces == 1


@pytest.mark.parametrize(
  ("shape", "n", "m", "axis", "match"),
  [
    ((8, 2), 0, 4, 0, r"breaks 1 <= n < m \(n=0, m=4\)"),
    ((8, 2), -1, 4, 0, r"breaks 1 <= n < m \(n=-1, m=4\)"),
    ((8, 2), 4, 4, 0, r"breaks 1 <= n < m \(n=4, m=4\)"),
    ((8, 2), 5, 4, 0, r"breaks 1 <= n < m \(n=5, m=4\)"),
    ((8, 2), 2.0, 4, 0, r"n and m must be integers"),
    ((10, 3), 2, 4, 0, r"shape \(10, 3\): axis 0 has size 10, not divisible by m=4"),
    ((3, 6), 1, 4, -1, r"shape \(3, 6\): axis 1 has size 6, not divisible by m=4"),
    ((3, 2, 5), 1, 4, (0, 1), r"axis \(0, 1\) has size 6, not divisible by m=4"),
    ((8, 2), 1, 4, 2, r"axis 2 is out of range for an array of rank 2"),
    ((8, 2), 1, 4, -3, r"axis -3 is out of range for an array of rank 2"),
    ((4, 2, 4), 1, 4, (0, 2), r"axis=\(0, 2\) must name distinct, adjacent axes"),
    ((4, 2, 4), 1, 4, (1, 1), r"axis=\(1, 1\) must name distinct, adjacent axes"),
    ((4, 2, 4), 1, 4, (), r"axis=\(\) names no axis"),
    ((4, 2), 1, 4, 0.0, r"axis=0.0 must be an int or a tuple of ints"),
  ],
)
def test_nm_mask_bad_input(shape, n, m, axis, match):
  with pytest.raises(ValueError, match=match):
    nm_mask(jnp.ones(shape), n, m, axis=axis)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.complex64])
def test_nm_mask_rejects_non_float(dtype):
  with pytest.raises(
    ValueError, match=f"needs a floating-point array, got dtype {jnp.dtype(dtype)}"
  ):
    nm_mask(jnp.ones((8, 2), dtype), 2, 4)


def test_parse_nm():
  assert parse_nm("1:8") == NM(1, 8)
  assert parse_nm(" 2 : 4 ") == NM(2, 4)
  assert parse_nm((3, 16)) == NM(3, 16)
  assert parse_nm([np.int64(5), np.int32(8)]) == NM(5, 8)
  assert parse_nm(NM(1, 4)) == NM(1, 4)
  assert str(NM(2, 4)) == "2:4" and NM(1, 8).density == 0.125


@pytest.mark.parametrize(
  ("spec", "match"),
  [
    ("1-8", r"'1-8' is not an N:M pattern"),
    ("1:8:2", r"'1:8:2' is not an N:M pattern"),
    ("a:8", r"'a:8' is not an N:M pattern"),
    ("-1:8", r"'-1:8' is not an N:M pattern"),
    ("", r"'' is not an N:M pattern"),
    ("0:8", r"0:8 breaks 1 <= n < m"),
    ("8:8", r"8:8 breaks 1 <= n < m"),
    ("9:8", r"9:8 breaks 1 <= n < m"),
    ((1,), r"\(1,\) is not an N:M pattern"),
    (None, r"None is not an N:M pattern"),
    ((1.0, 8), r"n and m must be integers"),
    ((True, 8), r"n and m must be integers"),
  ],
)
def test_parse_nm_bad_input(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_nm(spec, name="pattern")


def test_contraction_axes():
  assert contraction_axes(0, 2) == (0,)
  assert contraction_axes(-1, 3) == (2,)
  assert contraction_axes((1, 0), 3) == (0, 1)
  assert contraction_axes((-2, -1), 4) == (2, 3)
  assert contraction_axes(np.int64(1), 2) == (1,)
  with pytest.raises(ValueError, match=r"kernel: axis 3 is out of range for an array of rank 3"):
    contraction_axes(3, 3, where="kernel")

"""Export formats: the compressed N:M format and BCSR round-trip exactly against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import finalize, nm_mask, recipes
from nm_sparse_jax import policy as nmp
from nm_sparse_jax.export import (
  BCSRKernel,
  NMCompressed,
  compress,
  decompress,
  export,
  matrix_view,
  to_bcsr,
  unmatrix_view,
)
from nm_sparse_jax.models.vit import VisionTransformer, ViTConfig


def _np_matrix(w, axes):
  """(K, O): contraction axes flattened, then the axes before them and after them."""
  w = np.asarray(w)
  k = int(np.prod([w.shape[a] for a in axes]))
  grouped = w.reshape(int(np.prod(w.shape[: axes[0]])), k, -1)
  return grouped.transpose(1, 0, 2).reshape(k, -1)


def _np_compress(w, n, m, axes, keep):
  """Reference values/index by loops: kept positions of each (output, group), ascending."""
  mat, kmat = _np_matrix(w, axes).T, _np_matrix(keep, axes).T
  o, k = mat.shape
  values = np.zeros((o, k // m * n), mat.dtype)
  index = np.zeros((o, k // m * n), np.uint8)
  for r in range(o):
    for g in range(k // m):
      kept = [j for j in range(m) if kmat[r, g * m + j]]
      assert len(kept) == n
      for s, j in enumerate(kept):
        values[r, g * n + s] = mat[r, g * m + j]
        index[r, g * n + s] = j
  return values, index


def _nm_weight(key, shape, n, m, axes, dtype=jnp.float32):
  w = jax.random.normal(key, shape, jnp.float32).astype(dtype)
  return jnp.where(nm_mask(w, n, m, axis=axes), w, jnp.zeros((), dtype))


CASES = [
  ((16, 6), (0,), 1, 4),  # Dense kernel (in, out)
  ((32, 3), (0,), 2, 4),
  ((4, 8, 5), (0, 1), 1, 8),  # attention out (heads, head_dim, embed)
  ((16, 2, 3), (0,), 3, 8),  # attention query (embed, heads, head_dim)
  ((3, 16, 5), (1,), 2, 16),  # contraction axis in the middle
  ((128, 2), (0,), 16, 128),  # SDGF's 16:128
]


@pytest.mark.parametrize(
  "shape, axes, n, m, dtype",
  [case + (jnp.float32,) for case in CASES] + [case + (jnp.bfloat16,) for case in CASES[1:3]],
)
def test_compress_matches_numpy_and_round_trips(shape, axes, n, m, dtype, nm_reference):
  w = _nm_weight(jax.random.key(0), shape, n, m, axes, dtype)
  c = compress(w, n, m, axis=axes)
  keep = nm_reference(np.asarray(w, np.float32), n, m, axes)
  values, index = _np_compress(np.asarray(w, np.float32), n, m, axes, keep)
  np.testing.assert_array_equal(np.asarray(c.values, np.float32), values)
  np.testing.assert_array_equal(np.asarray(c.index), index)
  assert c.values.dtype == dtype and c.index.dtype == jnp.uint8
  assert (c.n, c.m, c.shape, c.axes) == (n, m, shape, axes)
  dense = decompress(c)
  assert dense.dtype == dtype and dense.shape == shape
  np.testing.assert_array_equal(np.asarray(dense, np.float32), np.asarray(w, np.float32))


def test_compress_of_a_dense_weight_keeps_the_nm_mask(nm_reference):
  w = jax.random.normal(jax.random.key(1), (32, 4))
  expected = np.where(nm_reference(w, 1, 8, 0), np.asarray(w), 0.0)
  np.testing.assert_array_equal(np.asarray(decompress(compress(w, 1, 8))), expected)


def test_groups_with_fewer_than_n_nonzeros_store_explicit_zeros():
  w = np.zeros((8, 2), np.float32)
  w[1, 0], w[6, 1] = 3.0, -2.0  # one nonzero in each of two groups, none in the others
  c = compress(w, 2, 4)
  np.testing.assert_array_equal(np.asarray(decompress(c)), w)
  assert int(jnp.count_nonzero(c.values)) == 2
  # The index still names n distinct positions of each group.
  index = np.asarray(c.index).reshape(2, 2, 2)
  assert (index[..., 0] != index[..., 1]).all()


def test_compress_is_jittable_and_a_pytree():
  w = _nm_weight(jax.random.key(2), (16, 4), 1, 4, (0,))
  c = jax.jit(compress, static_argnames=("n", "m", "axis"))(w, n=1, m=4, axis=0)
  assert isinstance(c, NMCompressed)
  leaves, tree = jax.tree_util.tree_flatten(c)
  assert len(leaves) == 2
  assert jax.tree_util.tree_unflatten(tree, leaves).shape == (16, 4)
  assert c.nbytes == 4 * 4 * (4 + 1) and (c.in_features, c.out_features) == (16, 4)


def test_matrix_view_round_trip():
  w = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  for axes in [(0,), (1, 2), (3,), (0, 1, 2)]:
    mat = matrix_view(w, axes)
    np.testing.assert_array_equal(np.asarray(mat), _np_matrix(w, axes))
    np.testing.assert_array_equal(np.asarray(unmatrix_view(mat, w.shape, axes)), np.asarray(w))


@pytest.mark.parametrize("shape, axes, n, m", CASES[1:5])
def test_bcsr_is_the_transposed_matrix_with_static_nse(shape, axes, n, m):
  w = _nm_weight(jax.random.key(3), shape, n, m, axes)
  b = to_bcsr(w, n, m, axis=axes)
  k, o = _np_matrix(w, axes).shape
  assert isinstance(b, BCSRKernel) and b.matrix.shape == (o, k)
  assert b.matrix.dtype == jnp.float32 and b.matrix.nse == o * k * n // m
  np.testing.assert_array_equal(np.asarray(b.matrix.todense()), _np_matrix(w, axes).T)
  indices = np.asarray(b.matrix.indices).reshape(o, -1)
  assert (np.diff(indices, axis=1) > 0).all()  # sorted, distinct columns in every row
  np.testing.assert_array_equal(np.asarray(b.matrix.indptr), np.arange(o + 1) * (k * n // m))


def test_bcsr_export_under_jit():
  w = _nm_weight(jax.random.key(4), (16, 8), 1, 4, (0,))
  b = jax.jit(to_bcsr, static_argnums=(1, 2))(w, 1, 4)
  np.testing.assert_array_equal(np.asarray(b.matrix.todense()), np.asarray(w).T)


def _vit_params():
  model = VisionTransformer(ViTConfig(hidden=32, depth=1, heads=2, mlp_dim=64))
  return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


@pytest.mark.parametrize("fmt, kind", [("nm", NMCompressed), ("bcsr", BCSRKernel)])
def test_export_replaces_exactly_the_selected_kernels(fmt, kind):
  pol = nmp.vit(recipes.ste(), ff="1:4", q="2:4", o="1:8")
  hard = finalize(_vit_params(), pol)
  exported = export(hard, pol, format=fmt)
  plan = pol.resolve(hard)
  flat_hard = dict(jax.tree_util.tree_flatten_with_path(hard)[0])
  selected = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(
    exported, is_leaf=lambda v: isinstance(v, kind)
  )[0]:
    name = nmp.path_str(path)
    if name in plan:
      selected += 1
      assert isinstance(leaf, kind)
      target = plan[name]
      assert (leaf.n, leaf.m, leaf.shape, leaf.axes) == (*target.nm, target.shape, target.axes)
      if fmt == "nm":
        np.testing.assert_array_equal(np.asarray(decompress(leaf)), np.asarray(flat_hard[path]))
      else:
        expected = _np_matrix(flat_hard[path], target.axes).T
        np.testing.assert_array_equal(np.asarray(leaf.matrix.todense()), expected)
    else:
      assert leaf is flat_hard[path]
  assert selected == len(plan) == 4


def test_export_refuses_weights_that_are_not_nm():
  pol = nmp.Policy([nmp.Rule("kernel", "1:4")], recipes.ste())
  with pytest.raises(ValueError, match=r"kernel \(shape \(8, 2\), axes \(0,\)\) is not 1:4"):
    export({"kernel": jnp.ones((8, 2))}, pol)
  assert isinstance(export({"kernel": jnp.ones((8, 2))}, pol, check=False)["kernel"], NMCompressed)


def test_export_and_compress_errors():
  pol = nmp.Policy([nmp.Rule("kernel", "1:4")], recipes.ste())
  with pytest.raises(ValueError, match="format='csr'; expected one of nm, bcsr"):
    export({"kernel": jnp.ones((8, 2))}, pol, format="csr")
  with pytest.raises(ValueError, match="m=512 is larger than 256"):
    compress(jnp.ones((512, 2)), 1, 512)
  with pytest.raises(ValueError, match="not divisible by m=8"):
    compress(jnp.ones((12, 2)), 1, 8)
  with pytest.raises(ValueError, match="breaks 1 <= n < m"):
    compress(jnp.ones((8, 2)), 4, 4)

"""finalize (hard N:M export) and verify (N:M report along contraction axes)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import NM, finalize, recipes, verify
from nm_sparse_jax.finalize import group_nonzeros
from nm_sparse_jax.policy import Policy, Rule, path_str

PHASES = {"total_steps": 100, "dense_steps": 10, "fine_tune_steps": 20}


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), dtype)

  return {
    "mlp": {"wi": {"kernel": normal(32, 16)}, "wo": {"kernel": normal(16, 32)}},
    "attention": {
      "query": {"kernel": normal(32, 4, 4)},  # (embed, heads, head_dim), contraction axis 0
      "out": {"kernel": normal(4, 4, 32)},  # (heads, head_dim, embed), contraction axes (0, 1)
    },
    "norm": {"scale": normal(32)},
    "step": jnp.zeros((), jnp.int32),
  }


# path -> (n, m, axis)
TARGETS = {
  "mlp/wi/kernel": (1, 8, 0),
  "mlp/wo/kernel": (2, 4, 0),
  "attention/query/kernel": (2, 8, 0),
  "attention/out/kernel": (1, 4, (0, 1)),
}


def _policy(recipe):
  return Policy(
    (
      Rule("mlp/wi/kernel", "1:8"),
      Rule("mlp/wo/kernel", "2:4"),
      Rule("query/kernel", "2:8", axis=0),
      Rule("out/kernel", "1:4", axis=(0, 1)),
    ),
    recipe,
  )


def _flat(tree):
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finalize_is_exactly_n_m(dtype, nm_reference, group_counts):
  params = _params(dtype=dtype)
  out = finalize(params, _policy(recipes.sr_ste()))
  flat_in, flat_out = _flat(params), _flat(out)
  assert flat_in.keys() == flat_out.keys()
  for path, leaf in flat_in.items():
    if path not in TARGETS:
      assert flat_out[path] is leaf, path
      continue
    n, m, axis = TARGETS[path]
    got = np.asarray(flat_out[path])
    assert got.dtype == np.asarray(leaf).dtype
    assert (group_counts(got, m, axis) == n).all(), path  # no zeros in the random weights
    np.testing.assert_array_equal(got, np.where(nm_reference(leaf, n, m, axis), leaf, 0), path)


@pytest.mark.parametrize(
  "name", ["ste", "sr_ste", "mdgf_linear", "mdgf_exponential", "sdgf_stepwise", "sdgf_geometric"]
)
def test_finalize_equals_sparsify_in_the_fine_tune_phase(name):
  recipe = recipes.get(name, **PHASES)
  policy = _policy(recipe)
  params = _params(seed=1)

  # SDGF-Geometric's k = 16 fits none of these axes: it warns and starts lower.
  def warns():
    return pytest.warns(UserWarning) if name == "sdgf_geometric" else contextlib.nullcontext()

  with warns():
    final = finalize(params, policy)
  with warns():
    sparse = jax.jit(policy.apply)(params, 80)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(sparse), strict=True):
    np.testing.assert_array_equal(a, b)


def test_finalize_dense_rule_changes_nothing():
  params = _params()
  out = finalize(params, Policy([Rule("mlp/wi/kernel", "1:8")], recipes.dense()))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out), strict=True):
    assert a is b


def test_verify_reports_pattern_and_sparsity():
  policy = _policy(recipes.ste())
  params = finalize(_params(seed=2), policy)
  report = verify(params, policy)
  assert report.ok
  layers = {layer.path: layer for layer in report.layers}
  assert layers.keys() == TARGETS.keys()
  for path, (n, m, axis) in TARGETS.items():
    layer = layers[path]
    assert layer.target == NM(n, m) and layer.satisfied == NM(n, m) and layer.ok
    assert layer.bad_groups == 0 and layer.sparsity == pytest.approx(1 - n / m)
    assert layer.axes == ((0, 1) if axis == (0, 1) else (0,))
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  total = sum(x.size for x in leaves)
  zeros = sum(x.size - np.count_nonzero(x) for x in leaves)
  assert (report.total_params, report.total_zeros) == (total, zeros)
  assert report.sparsity == pytest.approx(zeros / total)
  text = str(report)
  assert "attention/out/kernel" in text and "0,1" in text and "ok" in text
  # Sparser than the target still satisfies it.
  looser = _policy(recipes.ste()).rules[:1] + (Rule("mlp/wo/kernel", "3:4"),)
  report = verify(params, Policy(looser, recipes.ste()))
  assert report.ok and report.layers[1].satisfied == NM(2, 4)


def test_verify_dense_params_report_without_strict():
  params = _params(seed=3)
  report = verify(params, _policy(recipes.ste()), strict=False)
  assert not report.ok
  for layer in report.layers:
    n, m, _ = TARGETS[layer.path]
    assert layer.satisfied == NM(m, m) and layer.sparsity == 0.0
    assert layer.bad_groups == np.prod(layer.shape) // m
  assert "FAIL" in str(report)


def test_verify_strict_names_the_broken_parameter():
  policy = _policy(recipes.ste())
  params = finalize(_params(seed=4), policy)
  kernel = np.array(params["attention"]["out"]["kernel"])
  # Group 1 along axes (0, 1) (flattened entries 4..7) of embedding column 5: fill one zero.
  flat = kernel.reshape(16, 32)
  row = 4 + int(np.flatnonzero(flat[4:8, 5] == 0)[0])
  flat[row, 5] = 1.0
  broken = {
    **params,
    "attention": {**params["attention"], "out": {"kernel": flat.reshape(4, 4, 32)}},
  }
  with pytest.raises(
    ValueError,
    match=r"N:M verification failed:\nattention/out/kernel \(shape \(4, 4, 32\), axis \(0, 1\)\): "
    r"1 groups exceed 1:4 \(up to 2 nonzeros in a group of 4; first bad group at index \(1, 5\)",
  ):
    verify(broken, policy)
  report = verify(broken, policy, strict=False)
  bad = [layer for layer in report.layers if not layer.ok]
  assert [(b.path, b.bad_groups, b.satisfied) for b in bad] == [
    ("attention/out/kernel", 1, NM(2, 4))
  ]


def test_group_nonzeros(group_counts):
  x = np.random.default_rng(5).normal(size=(4, 8, 3))
  x[x < 0.3] = 0.0
  np.testing.assert_array_equal(group_nonzeros(x, 4, 1), np.moveaxis(group_counts(x, 4, 1), 1, 0))
  counts = group_nonzeros(x, 8, (0, 1))
  assert counts.shape == (4, 3)
  np.testing.assert_array_equal(counts, group_counts(x, 8, (0, 1))[0])

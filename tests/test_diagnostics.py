"""Diagnostics against NumPy references: variances, flips, patterns, D(j) and sparsity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nm_sparse_jax import diagnostics as dg
from nm_sparse_jax import policy as nmp
from nm_sparse_jax import recipes
from nm_sparse_jax.transform import nm_sparsity, sparsity_step

FF0 = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
FF1 = "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel"
Q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"


def _params(seed=0):
  rng = np.random.default_rng(seed)
  attn = {
    name: {"kernel": jnp.asarray(rng.normal(size=(16, 2, 4)), jnp.float32)}
    for name in ("query", "key", "value")
  }
  attn["out"] = {"kernel": jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)}
  mlp = {
    "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)},
    "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)},
  }
  return {
    "Transformer": {"encoderblock_0": {"MlpBlock_0": mlp, "MultiHeadDotProductAttention_0": attn}},
    "head": {"kernel": jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)},
  }


def _optax(fn, *args):
  """Runs an optax call with standard promotion: optax's Adam is not strict-promotion clean
  (``b1 ** count`` mixes a Python float and int32); the diagnostics themselves run strict."""
  with jax.numpy_dtype_promotion("standard"):
    return fn(*args)


def _flat(tree):
  return {nmp.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda p: jnp.asarray(rng.normal(size=p.shape) * rng.uniform(0.1, 2.0), jnp.float32), params
  )


def test_small_functions_match_numpy():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(3, 4)), rng.normal(size=(5,)) + 3.0]
  expected = np.var(np.concatenate([x.ravel() for x in xs]))
  np.testing.assert_allclose(
    dg.pooled_variance([jnp.asarray(x, jnp.float32) for x in xs]), expected, rtol=1e-5
  )
  z = [np.array([0.0, 1.0, 0.0]), np.zeros((2, 2)), np.ones(3)]
  assert float(dg.zero_fraction([jnp.asarray(a, jnp.float32) for a in z])) == pytest.approx(6 / 10)
  a, b = rng.random((6, 7)) > 0.5, rng.random((6, 7)) > 0.5
  c, d = rng.random(9) > 0.5, rng.random(9) > 0.5
  flips = (np.sum(a != b) + np.sum(c != d)) / (a.size + c.size)
  got = dg.flip_rate([jnp.asarray(a), jnp.asarray(c)], [jnp.asarray(b), jnp.asarray(d)])
  assert float(got) == pytest.approx(flips)


def test_adam_nu_found_in_chains_and_absent_elsewhere():
  params = {"w": jnp.ones((2, 3))}
  tx = optax.chain(optax.adamw(1e-3), optax.scale(1.0))
  state = _optax(tx.update, {"w": jnp.full((2, 3), 2.0)}, tx.init(params), params)[1]
  np.testing.assert_allclose(dg.adam_nu(state)["w"], np.full((2, 3), 0.001 * 4.0), rtol=1e-6)
  assert dg.adam_nu(optax.sgd(0.1).init(params)) is None
  with pytest.raises(ValueError, match="found 2 ScaleByAdamState"):
    dg.adam_nu(optax.chain(optax.adam(1e-3), optax.adam(1e-3)).init(params))


def test_layer_groups_and_errors():
  groups = dg.layer_groups("vit", ["ff", "qkv"])
  assert groups["ff"] == (r"MlpBlock_\d+/Dense_[01]/kernel$",)
  assert len(groups["qkv"]) == 3
  with pytest.raises(ValueError, match="unknown naming 'bert'"):
    dg.layer_groups("bert")
  with pytest.raises(ValueError, match="unknown layer group 'mlp' of 'vit'"):
    dg.layer_groups("vit", ["mlp"])


@pytest.mark.parametrize(
  "groups, match",
  [
    ({"ff": "nothing_here"}, "group 'ff' \\(nothing_here\\) matches no parameter"),
    ({"a/b": "kernel"}, "must not contain '/'"),
    ({"ff": "("}, "is not a regular expression"),
  ],
)
def test_bad_groups_raise(groups, match):
  pol = nmp.vit(recipes.sr_ste(), ff="1:8")
  with pytest.raises(ValueError, match=match):
    dg.nm_diagnostics(pol, groups=groups).init(_params())


def test_default_groups_follow_policy_rules():
  pol = nmp.vit(recipes.sr_ste(), ff="1:8", qkv="1:4")
  diag = dg.nm_diagnostics(pol)
  metrics, _ = jax.jit(diag.update)(diag.init(_params()), _params(), _grads(_params(), 1), 0)
  assert {k.split("/")[0] for k in metrics} == {"ff", "q", "k", "v"}
  assert "ff/nu_var" not in metrics  # no optimizer state given


def _reference_mask(reference, w, pattern, axis=0):
  """All ones, or the conftest's NumPy N:M mask (stable argsort of -|w| per group)."""
  if pattern is None:
    return np.ones(w.shape, bool)
  return reference(w, pattern[0], pattern[1], axis)


@pytest.mark.parametrize("recipe_name", ["mdgf_exponential", "sdgf_stepwise", "sr_ste", "dense"])
def test_update_matches_numpy_reference(recipe_name, nm_reference):
  total, dense_steps, fine_tune = 20, 2, 4
  recipe = recipes.get(
    recipe_name, total_steps=total, dense_steps=dense_steps, fine_tune_steps=fine_tune
  )
  pol = nmp.vit(recipe, ff="1:8")
  groups = dg.layer_groups("vit", ["ff", "qkv"])
  diag = dg.nm_diagnostics(pol, groups=groups)
  tx = optax.chain(optax.adam(1e-2), nm_sparsity(pol))
  params = _params()
  opt_state = tx.init(params)
  state = diag.init(params)
  tx_update = jax.jit(lambda g, s, p: _optax(tx.update, g, s, p))
  apply = jax.jit(pol.apply)
  traces = []

  def update(state, params, grads, step, opt_state):
    traces.append(1)
    return diag.update(state, params, grads, step, opt_state)

  update = jax.jit(update)
  # Hand-computed patterns of the FF kernels: sparsification is steps [2, 16), L = 14.
  stepwise = {2: (7, 8), 5: (7, 8), 6: (4, 8), 9: (2, 8), 13: (1, 8), 16: (1, 8)}
  previous = None
  for j in range(total):
    step = int(sparsity_step(opt_state))
    assert step == j
    grads = _grads(params, 100 + j)
    updates, new_opt_state = tx_update(grads, opt_state, params)
    metrics, state = update(state, params, grads, step, new_opt_state)
    w, g = _flat(params), _flat(grads)
    nu = _flat(optax.tree_utils.tree_get(new_opt_state, "nu"))
    ff = [FF0, FF1]
    # The pattern in use, by hand.
    if recipe_name == "dense" or j < dense_steps:
      pattern, decay = None, 1.0
    elif recipe_name == "sdgf_stepwise":
      pattern = stepwise[max(k for k in stepwise if k <= j)]
      decay = 0.0
    else:
      pattern = (1, 8)
      beta = np.log(1000.0) / (total - fine_tune - dense_steps)
      in_decay = recipe_name == "mdgf_exponential" and j < total - fine_tune
      decay = float(np.exp(-beta * (j - dense_steps))) if in_decay else 0.0
    masks = [_reference_mask(nm_reference, w[p], pattern) for p in ff]
    targets = [_reference_mask(nm_reference, w[p], (1, 8)) for p in ff]
    w_tilde = [np.where(mk, w[p], w[p] * np.float32(decay)) for mk, p in zip(masks, ff)]
    cat = lambda xs: np.concatenate([np.ravel(x) for x in xs])  # noqa: E731
    np.testing.assert_allclose(
      metrics["ff/grad_abs_var"], np.var(cat([np.abs(g[p]) for p in ff])), rtol=2e-5
    )
    np.testing.assert_allclose(metrics["ff/nu_var"], np.var(cat([nu[p] for p in ff])), rtol=2e-4)
    assert (int(metrics["ff/n"]), int(metrics["ff/m"])) == (pattern or (1, 1))
    np.testing.assert_allclose(metrics["ff/decay"], decay, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["ff/mask_density"], cat(masks).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["ff/sparsity"], (cat(w_tilde) == 0).mean(), rtol=1e-6)
    # The sparse weight the model uses (the core's policy.apply) has the same zeros.
    applied = _flat(apply(params, step))
    assert (cat([applied[p] for p in ff]) == 0).mean() == pytest.approx(
      float(metrics["ff/sparsity"])
    )
    if previous is None:
      assert float(metrics["ff/flip_rate"]) == 0.0
      assert float(metrics["ff/target_flip_rate"]) == 0.0
    else:
      flips = np.mean(cat(masks) != cat(previous[0]))
      target_flips = np.mean(cat(targets) != cat(previous[1]))
      assert float(metrics["ff/flip_rate"]) == pytest.approx(flips)
      assert float(metrics["ff/target_flip_rate"]) == pytest.approx(target_flips)
    # The QKV group is dense under this policy.
    assert (int(metrics["qkv/n"]), int(metrics["qkv/m"])) == (1, 1)
    assert float(metrics["qkv/sparsity"]) == 0.0 and "qkv/target_flip_rate" not in metrics
    previous = (masks, targets)
    params = optax.apply_updates(params, updates)
    opt_state = new_opt_state
  assert len(traces) == 1  # one trace for all steps and phases
  assert int(state.count) == total


def test_state_structure_is_stable():
  pol = nmp.vit(recipes.sdgf_stepwise(total_steps=10, dense_steps=1), ff="1:8")
  diag = dg.nm_diagnostics(pol, groups=dg.layer_groups("vit", ["ff"]))
  params = _params()
  state = diag.init(params)
  _, new = jax.jit(diag.update)(state, params, _grads(params, 0), 5)
  spec = lambda s: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s)  # noqa: E731
  assert spec(new) == spec(state)
  assert sorted(state.active) == [FF0, FF1] and sorted(state.target) == [FF0, FF1]
  assert Q not in state.active


def test_active_mask_follows_sdgf_intervals(nm_reference):
  params = _params()
  recipe = recipes.sdgf_stepwise(total_steps=10, dense_steps=2, fine_tune_steps=0)
  plan = nmp.vit(recipe, ff="1:8").resolve(params)
  w = params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  for step, n in [(0, None), (2, 7), (4, 4), (6, 2), (9, 1)]:
    got = np.asarray(dg.active_mask(w, plan[FF0], step))
    expected = _reference_mask(nm_reference, np.asarray(w), n and (n, 8))
    np.testing.assert_array_equal(got, expected)

"""Sparsified (nn.map_variables) and intercept (nn.intercept_methods) on the ViT of models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import linen, policy, recipes
from nm_sparse_jax.models import VisionTransformer, ViTConfig
from nm_sparse_jax.policy import Policy, Rule

CONFIG = ViTConfig(hidden=32, depth=1, heads=4, mlp_dim=64, num_classes=5)
RECIPE = recipes.mdgf_linear(total_steps=100, dense_steps=10, fine_tune_steps=20, beta=0.02)
POLICY = policy.vit(RECIPE, ff="1:4", qkv="2:4", o="1:8")
# Dense phase, D = 0.8 and D = 0.2 in the sparsification phase, fine-tune phase.
STEPS = (5, 20, 50, 90)


def _images(dtype=jnp.float32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(3, 8, 8, 1)), dtype)


def _labels():
  return jax.nn.one_hot(jnp.array([0, 3, 4]), CONFIG.num_classes)


def _xent(logits):
  return -jnp.mean(jnp.sum(_labels().astype(logits.dtype) * jax.nn.log_softmax(logits), axis=-1))


@pytest.fixture(scope="module")
def vit():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    model = VisionTransformer(CONFIG)
    return model, jax.jit(model.init)(jax.random.key(0), _images())["params"]


def _three_ways(model, pol):
  """The loss and its gradient through policy.apply, Sparsified and intercept, jitted."""

  def functional(params, step, x):
    return _xent(model.apply({"params": pol.apply(params, step)}, x))

  sparsified = linen.Sparsified(model, pol)

  def wrapped(params, step, x):
    return _xent(sparsified.apply({"params": params, "nm_sparsity": {"step": step}}, x))

  def intercepted(params, step, x):
    with linen.intercept(pol, step):
      return _xent(model.apply({"params": params}, x))

  return [jax.jit(jax.value_and_grad(f)) for f in (functional, wrapped, intercepted)]


@pytest.fixture(scope="module")
def ways(vit):
  return _three_ways(vit[0], POLICY)


def test_three_ways_agree_jitted(vit, ways):
  model, params = vit
  x = _images()
  for step in STEPS:
    (loss, grads), *others = [f(params, step, x) for f in ways]
    assert np.isfinite(loss)
    for other_loss, other_grads in others:
      np.testing.assert_allclose(other_loss, loss, rtol=1e-6, err_msg=f"step {step}")
      for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
  # The sparse weights matter: the loss differs from the dense model's from the sparse phases on.
  dense_loss = _xent(model.apply({"params": params}, x))
  for f in ways:
    np.testing.assert_allclose(f(params, 5, x)[0], dense_loss, rtol=1e-6)
    assert abs(float(f(params, 90, x)[0]) - float(dense_loss)) > 1e-4


def test_gradients_follow_the_recipe(vit, ways, nm_reference):
  """At step 50 (D = 0.2) pruned kernel entries get 0.2 times the dense-weights gradient."""
  model, params = vit
  x = _images(seed=1)
  step = 50
  sparse_params = POLICY.apply(params, step)
  grads_of_sparse = jax.jit(jax.grad(lambda p: _xent(model.apply({"params": p}, x))))(sparse_params)
  grads = ways[1](params, step, x)[1]
  path = ("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_0", "out", "kernel")
  w, g, g_sparse = params, grads, grads_of_sparse
  for key in path:
    w, g, g_sparse = w[key], g[key], g_sparse[key]
  phi = nm_reference(w, 1, 8, (0, 1))
  expected = np.where(phi, g_sparse, 0.2 * np.asarray(g_sparse))
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(g, g_sparse, rtol=1e-3, atol=1e-6)


def test_sparsified_init_matches_the_bare_model(vit):
  model, params = vit
  wrapped = jax.jit(linen.Sparsified(model, POLICY).init)(jax.random.key(0), _images())
  assert set(wrapped) == {"params"}
  assert jax.tree.structure(wrapped["params"]) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(wrapped["params"]), jax.tree.leaves(params), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_sparsified_needs_the_step(vit):
  model, params = vit
  with pytest.raises(
    ValueError,
    match=r"Sparsified.apply needs the training step: pass "
    r"\{'nm_sparsity': \{'step': sparsity_step\(opt_state\)\}\}",
  ):
    linen.Sparsified(model, POLICY).apply({"params": params}, _images())


def test_intercept_with_dropout_rngs_matches_functional(vit):
  """Modules other than the owners of selected kernels keep their RNG streams."""
  _, params = vit
  model = VisionTransformer(CONFIG._replace(dropout=0.5))
  x, rngs = _images(), {"dropout": jax.random.key(7)}
  expected = model.apply({"params": POLICY.apply(params, 50)}, x, train=True, rngs=rngs)
  with linen.intercept(POLICY, 50):
    got = model.apply({"params": params}, x, train=True, rngs=rngs)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert not np.allclose(got, model.apply({"params": POLICY.apply(params, 50)}, x))


class _DropoutDense(nn.Module):
  """A module that declares a selected kernel itself and draws dropout RNGs."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))
    return nn.Dropout(0.5, deterministic=False)(x @ kernel)


def test_intercept_forwards_rngs_to_a_selected_module():
  model = _DropoutDense()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  pol = Policy([Rule("kernel", "1:4")], recipes.ste())
  rngs = {"dropout": jax.random.key(3)}
  expected = model.apply({"params": pol.apply(params, 0)}, x, rngs=rngs)
  with linen.intercept(pol, 0):
    got = model.apply({"params": params}, x, rngs=rngs)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert (np.asarray(got) == 0).any()


class _MlpWithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8, name="fc1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(2, name="fc2")(nn.relu(x))


def test_intercept_with_mutable_batch_stats():
  model = _MlpWithBatchNorm()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  pol = Policy([Rule("fc1/kernel", "1:4"), Rule("fc2/kernel", "2:8")], recipes.ste())
  sparse = {**variables, "params": pol.apply(variables["params"], 0)}
  y0, stats0 = model.apply(sparse, x, mutable=["batch_stats"])
  with linen.intercept(pol, 0):
    y, stats = model.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


class _TwoLayers(nn.Module):
  def setup(self):
    self.a = nn.Dense(4)
    self.b = nn.Dense(4)

  def __call__(self, x, use_b: bool = True):
    x = self.a(x)
    return self.b(x) if use_b else x


def test_intercept_raises_when_a_selected_module_never_ran():
  model = _TwoLayers()
  x = jnp.ones((1, 8))
  params = model.init(jax.random.key(0), x)["params"]
  pol = Policy([Rule("kernel", "1:4")], recipes.ste())
  with linen.intercept(pol, 3):
    model.apply({"params": params}, x)
  message = r"intercept: these selected parameters were never used .*: b/kernel$"
  with pytest.raises(ValueError, match=message):
    with linen.intercept(pol, 3):
      model.apply({"params": params}, x, use_b=False)
  with pytest.raises(ValueError, match=message):
    with linen.intercept(pol, 3):
      model.apply({"params": params}, x, method=lambda m, x: m.a(x))


def test_intercept_does_not_nest_and_leaves_init_alone():
  model = _TwoLayers()
  x = jnp.ones((1, 8))
  pol = Policy([Rule("kernel", "1:4")], recipes.ste())
  with linen.intercept(pol, 3):
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"intercept contexts do not nest"):
      with linen.intercept(pol, 3):
        pass
  expected = model.init(jax.random.key(0), x)["params"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)
  with linen.intercept(pol, 3):  # the context is usable again
    model.apply({"params": params}, x)


def test_intercept_bad_policy(vit):
  model, params = vit
  pol = Policy([Rule("query/kernel", "1:4")], RECIPE)
  with pytest.raises(ValueError, match=r"cannot infer the contraction axis of a rank-3 kernel"):
    with linen.intercept(pol, 0):
      model.apply({"params": params}, _images())


def test_bfloat16_params_stay_bfloat16(vit):
  # Flax's LayerNorm promotes bfloat16 statistics to float32 with jnp.promote_types, which
  # strict promotion rejects: this test alone runs the (flax) model under standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    _check_bfloat16(*vit)


def _check_bfloat16(model, params):
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  x = _images(jnp.bfloat16)
  sparse = jax.eval_shape(POLICY.apply, params, 20)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(sparse))
  results = [f(params, 20, x) for f in _three_ways(model, POLICY)[1:]]  # Sparsified, intercept
  for loss, grads in results:
    assert loss.dtype == jnp.bfloat16 and np.isfinite(float(loss))
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2)

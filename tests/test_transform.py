"""The optax transformation: step counter, state, and the fine-tune projection onto exact N:M."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nm_sparse_jax import NMSparsityState, nm_sparsity, recipes, sparsity_step, verify
from nm_sparse_jax.policy import Policy, Rule

# ste with T = 6, s = 3: the parameters produced by the update at count 2 -> 3 are the first
# of the fine-tune phase.
T, S = 6, 3


def _adam(learning_rate):
  """optax.adam, run with standard dtype promotion.

  Its bias correction raises a float to the int32 count, which strict promotion rejects; that is
  optax's code, so only it is exempted: nm_sparsity stays under strict promotion.
  """
  adam = optax.adam(learning_rate)

  def update(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return adam.update(updates, state, params)

  return optax.GradientTransformation(adam.init, update)


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(16, 3)), dtype),
      "bias": jnp.asarray(rng.normal(size=(3,)), dtype),
    },
    "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), dtype)},
  }


def _policy(recipe=None):
  return Policy(
    [Rule("dense/kernel", "1:4")], recipe or recipes.ste(total_steps=T, fine_tune_steps=S)
  )


def _loss(params, step, policy):
  x = jnp.linspace(-1.0, 1.0, 32, dtype=params["dense"]["kernel"].dtype).reshape(2, 16)
  p = policy.apply(params, step)
  h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"][None])
  return jnp.sum(jnp.square(h @ p["head"]["kernel"] - 1.0).astype(jnp.float32))


def _signature(tree):
  return jax.tree.structure(tree), [
    (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)
  ]


def test_state_is_an_int32_scalar_count():
  state = nm_sparsity(_policy()).init(_params())
  assert isinstance(state, NMSparsityState)
  assert state.count.shape == () and state.count.dtype == jnp.int32 and int(state.count) == 0


def test_chain_with_adam_counts_steps_and_keeps_its_state_signature():
  policy = _policy()
  tx = optax.chain(_adam(1e-2), nm_sparsity(policy))
  params = _params()
  state = tx.init(params)
  signature = _signature(state)
  traces = 0

  @jax.jit
  def train_step(params, state):
    nonlocal traces
    traces += 1
    step = sparsity_step(state)
    grads = jax.grad(_loss)(params, step, policy)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  losses = []
  for j in range(T + 2):
    assert int(sparsity_step(state)) == j
    losses.append(float(_loss(params, sparsity_step(state), policy)))
    params, state = train_step(params, state)
    assert _signature(state) == signature
  assert int(sparsity_step(state)) == T + 2 and traces == 1
  assert isinstance(state[1], NMSparsityState) and state[1].count.dtype == jnp.int32
  assert losses[-1] < losses[S]  # it trains


def test_sparsity_step_needs_exactly_one_state():
  params = _params()
  policy = _policy()
  assert int(sparsity_step(nm_sparsity(policy).init(params))) == 0
  with pytest.raises(ValueError, match=r"expected one NMSparsityState .* found 0; add"):
    sparsity_step(optax.adam(1e-3).init(params))
  two = optax.chain(nm_sparsity(policy), optax.sgd(0.1), nm_sparsity(policy)).init(params)
  with pytest.raises(ValueError, match=r"expected one NMSparsityState .* found 2"):
    sparsity_step(two)


def _group_counts_axis0(x, m):
  x = np.asarray(x)
  return np.count_nonzero(x.reshape(x.shape[0] // m, m, *x.shape[1:]), axis=1)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_fine_tune_projection(jit, nm_reference):
  policy = _policy()
  sgd = optax.sgd(0.1)
  tx = optax.chain(sgd, nm_sparsity(policy))
  params = _params(seed=1)
  state, plain_state = tx.init(params), sgd.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for j in range(T + 1):  # the update at count j produces the parameters of step j + 1
    grads = jax.grad(_loss)(params, j, policy)
    updates, state = update(grads, state, params)
    plain, plain_state = sgd.update(grads, plain_state, params)
    assert int(state[1].count) == j + 1
    # Unselected leaves: bit-identical updates in every phase.
    for path in (("dense", "bias"), ("head", "kernel")):
      a, b = updates[path[0]][path[1]], plain[path[0]][path[1]]
      assert a.dtype == b.dtype and np.array_equal(a, b)
    w = np.asarray(params["dense"]["kernel"])
    u, u_plain = np.asarray(updates["dense"]["kernel"]), np.asarray(plain["dense"]["kernel"])
    params = optax.apply_updates(params, updates)
    kernel = np.asarray(params["dense"]["kernel"])
    if j + 1 < T - S:  # before the fine-tune phase: untouched, and not N:M
      assert np.array_equal(u, u_plain)
      assert (_group_counts_axis0(kernel, 4) > 1).any()
      assert not verify(params, policy, strict=False).ok
    else:  # exactly 1:4: pruned weights of Phi(W + u) get u = -W
      keep = nm_reference(w + u_plain, 1, 4, 0)
      np.testing.assert_array_equal(u, np.where(keep, u_plain, -w))
      assert (_group_counts_axis0(kernel, 4) <= 1).all()
      np.testing.assert_array_equal(kernel[~keep], 0.0)
      report = verify(params, policy)
      assert report.ok and str(report.layers[0].satisfied) == "1:4"


def test_projection_with_adam_keeps_the_kernel_exactly_n_m():
  policy = _policy(recipes.mdgf_linear(total_steps=T, fine_tune_steps=S, beta=0.5))
  tx = optax.chain(_adam(0.1), nm_sparsity(policy))
  params = _params(seed=2)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, sparsity_step(s), policy), s, p))
  for j in range(T + 3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    if j + 1 >= T - S:
      assert (_group_counts_axis0(params["dense"]["kernel"], 4) <= 1).all(), j


def test_bfloat16_params_stay_bfloat16():
  policy = _policy()
  tx = optax.chain(optax.sgd(0.1), nm_sparsity(policy))
  params = _params(seed=3, dtype=jnp.bfloat16)
  state = tx.init(params)
  for j in range(T):
    grads = jax.grad(_loss)(params, j, policy)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
  assert verify(params, policy).ok


def test_no_projection_before_fine_tune_or_without_one():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  for recipe in (recipes.ste(), recipes.dense(total_steps=2, fine_tune_steps=2)):
    tx = nm_sparsity(Policy([Rule("dense/kernel", "1:4")], recipe))
    updates, state = tx.update(grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
      assert a is b


def test_update_needs_params():
  tx = nm_sparsity(_policy())
  params = _params()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"needs params: call tx.update\(updates, state, params\)"):
    tx.update(params, state)
  tx = nm_sparsity(_policy(), project_fine_tune=False)
  updates, state = tx.update(params, tx.init(params))
  assert updates is params and int(state.count) == 1


def test_init_resolves_the_policy():
  with pytest.raises(ValueError, match=r"rule 0 \('dense/kernel', 1:4\) matches no parameter"):
    nm_sparsity(_policy()).init({"kernel": jnp.ones((8, 2))})
  with pytest.raises(
    ValueError,
    match=r"dense/kernel with shape \(16, 3\): axis 0 has size 16, "
    r"not divisible by m=32",
  ):
    nm_sparsity(Policy([Rule("dense/kernel", "1:32")], recipes.ste())).init(_params())


def test_projection_keeps_the_largest_of_the_new_weights():
  # 1:4 along axis 0, fine-tune phase from step 0. The update makes entry 1 the largest of
  # W + u, so entry 1 is kept (W + u) and the others become exactly 0 (u = -W).
  policy = Policy([Rule("kernel", "1:4")], recipes.ste(total_steps=1, fine_tune_steps=1))
  tx = nm_sparsity(policy)
  params = {"kernel": jnp.array([[1.0, 0.2], [0.9, -0.3], [0.1, 0.1], [0.05, 0.0]])}
  updates = {"kernel": jnp.array([[-0.95, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.5]])}
  projected, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  w, u = np.asarray(params["kernel"]), np.asarray(updates["kernel"])
  keep = np.array([[False, False], [True, False], [False, False], [False, True]])
  np.testing.assert_array_equal(projected["kernel"], np.where(keep, u, -w))
  new = np.asarray(optax.apply_updates(params, projected)["kernel"])
  np.testing.assert_array_equal(new, np.where(keep, w + u, 0.0))

"""sparsify: W~ = W * (Phi + D (1 - Phi)) and each recipe's gradient, against NumPy references.

All recipes target 1:4 with T = 100, d = 10, s = 20: dense [0, 10), sparsification [10, 80),
fine-tune from 80. The tables give, per step, the phase, the pattern of Phi (None: all ones) and
D(j), computed by hand from the paper's definitions (§3).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import recipes, sparsify

PHASES = {"total_steps": 100, "dense_steps": 10, "fine_tune_steps": 20}
LAMBDA_W = 0.5  # SR-STE's lambda_w, large enough to see.

D, S, F = "dense", "sparsify", "fine_tune"

# MDGF-Linear, beta = 0.02: D = max(1 - 0.02 (j - 10), 0).
LINEAR = [
  (0, D, None, 1.0),
  (9, D, None, 1.0),
  (10, S, (1, 4), 1.0),
  (35, S, (1, 4), 0.5),
  (55, S, (1, 4), 0.1),
  (65, S, (1, 4), 0.0),
  (79, S, (1, 4), 0.0),
  (80, F, (1, 4), 0.0),
  (99, F, (1, 4), 0.0),
  (150, F, (1, 4), 0.0),
]
# MDGF-Exponential, beta = 0.05: D = exp(-0.05 (j - 10)).
EXPONENTIAL = [
  (9, D, None, 1.0),
  (10, S, (1, 4), 1.0),
  (30, S, (1, 4), math.exp(-1.0)),
  (70, S, (1, 4), math.exp(-3.0)),
  (79, S, (1, 4), math.exp(-3.45)),
  (80, F, (1, 4), 0.0),
]
# SDGF-Stepwise 1:4: 3:4, 2:4, 1:4 over L = 70 steps: [10, 34), [34, 57), [57, 80).
STEPWISE = [
  (9, D, None, 1.0),
  (10, S, (3, 4), 0.0),
  (33, S, (3, 4), 0.0),
  (34, S, (2, 4), 0.0),
  (56, S, (2, 4), 0.0),
  (57, S, (1, 4), 0.0),
  (79, S, (1, 4), 0.0),
  (80, F, (1, 4), 0.0),
  (99, F, (1, 4), 0.0),
]
# SDGF-Geometric 1:4, k = 16, on a contraction axis of 64: 16:64, 8:32, 4:16, 2:8, 1:4 over 14
# steps each: [10, 24), [24, 38), [38, 52), [52, 66), [66, 80).
GEOMETRIC = [
  (9, D, None, 1.0),
  (10, S, (16, 64), 0.0),
  (23, S, (16, 64), 0.0),
  (24, S, (8, 32), 0.0),
  (37, S, (8, 32), 0.0),
  (38, S, (4, 16), 0.0),
  (52, S, (2, 8), 0.0),
  (65, S, (2, 8), 0.0),
  (66, S, (1, 4), 0.0),
  (79, S, (1, 4), 0.0),
  (80, F, (1, 4), 0.0),
]
# STE and SR-STE: forward W * Phi after the dense phase.
STE = [
  (0, D, None, 1.0),
  (9, D, None, 1.0),
  (10, S, (1, 4), 0.0),
  (50, S, (1, 4), 0.0),
  (79, S, (1, 4), 0.0),
  (80, F, (1, 4), 0.0),
  (99, F, (1, 4), 0.0),
]
DENSE = [(0, D, None, 1.0), (10, D, None, 1.0), (80, D, None, 1.0), (99, D, None, 1.0)]

# (id, recipe, table)
RECIPES = [
  ("dense", recipes.dense("1:4", **PHASES), DENSE),
  ("ste", recipes.ste("1:4", **PHASES), STE),
  ("sr_ste", recipes.sr_ste("1:4", lambda_w=LAMBDA_W, **PHASES), STE),
  ("mdgf_linear", recipes.mdgf_linear("1:4", beta=0.02, **PHASES), LINEAR),
  (
    "mdgf_linear-straight_through",
    recipes.mdgf_linear("1:4", beta=0.02, gradient="straight_through", **PHASES),
    LINEAR,
  ),
  ("mdgf_exponential", recipes.mdgf_exponential("1:4", beta=0.05, **PHASES), EXPONENTIAL),
  (
    "mdgf_exponential-straight_through",
    recipes.mdgf_exponential("1:4", beta=0.05, gradient="straight_through", **PHASES),
    EXPONENTIAL,
  ),
  ("sdgf_stepwise", recipes.sdgf_stepwise("1:4", **PHASES), STEPWISE),
  (
    "sdgf_stepwise-straight_through",
    recipes.sdgf_stepwise("1:4", gradient="straight_through", **PHASES),
    STEPWISE,
  ),
  ("sdgf_geometric", recipes.sdgf_geometric("1:4", **PHASES), GEOMETRIC),
  (
    "sdgf_geometric-straight_through",
    recipes.sdgf_geometric("1:4", gradient="straight_through", **PHASES),
    GEOMETRIC,
  ),
]
RECIPE_IDS = [r[0] for r in RECIPES]


def _weights(shape=(64, 3), dtype=jnp.float32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _reference(recipe, row, w, g, axis, nm_reference):
  """Expected W~ and dW (float64) for one table row, from the formulas of sparsify's docstring."""
  _, phase, pattern, decay = row
  w = np.asarray(w).astype(np.float64)
  g = np.asarray(g).astype(np.float64)
  phi = np.ones(w.shape) if pattern is None else nm_reference(w, *pattern, axis).astype(float)
  forward = w * (phi + decay * (1 - phi))
  if recipe.name in ("ste", "sr_ste") and phase == S:
    grad = g + recipe.lambda_w * (1 - phi) * w
  elif recipe.gradient == "straight_through":
    grad = g
  else:  # autodiff of the product; D = 1 (dense phase) and D = 0 (fine-tune phase) included.
    grad = g * (phi + decay * (1 - phi))
  return forward, grad, phi.astype(bool)


def _forward_and_grad(recipe, axis, w, step, g):
  y, vjp = jax.vjp(lambda v: sparsify(v, recipe, step, axis=axis), w)
  return y, vjp(g)[0]


def _check_row(recipe, row, w, g, axis, y, dw, nm_reference, rtol=1e-6, atol=1e-6):
  forward, grad, phi = _reference(recipe, row, w, g, axis, nm_reference)
  y, dw = np.asarray(y), np.asarray(dw)
  assert y.dtype == w.dtype and dw.dtype == w.dtype, f"step {row[0]}"
  np.testing.assert_allclose(y.astype(np.float64), forward, rtol=rtol, err_msg=f"step {row[0]}")
  np.testing.assert_array_equal(y[phi], np.asarray(w)[phi], err_msg=f"step {row[0]}: kept")
  np.testing.assert_allclose(
    dw.astype(np.float64), grad, rtol=rtol, atol=atol, err_msg=f"step {row[0]}: grad"
  )


@pytest.mark.parametrize(("recipe", "table"), [r[1:] for r in RECIPES], ids=RECIPE_IDS)
def test_forward_and_gradient_jitted_without_recompiling(recipe, table, nm_reference):
  w = _weights()
  g = _weights(seed=1)
  traces = 0

  @jax.jit
  def f(w, step, g):
    nonlocal traces
    traces += 1
    return _forward_and_grad(recipe, 0, w, step, g)

  for row in table:
    y, dw = f(w, row[0], g)
    _check_row(recipe, row, w, g, 0, y, dw, nm_reference)
  assert traces == 1


@pytest.mark.parametrize(
  ("recipe", "table"), [RECIPES[i][1:] for i in (2, 3, 9)], ids=[RECIPE_IDS[i] for i in (2, 3, 9)]
)
def test_forward_and_gradient_eager(recipe, table, nm_reference):
  w = _weights(seed=2)
  g = _weights(seed=3)
  for row in table[::3] + table[-1:]:
    y, dw = _forward_and_grad(recipe, 0, w, row[0], g)
    _check_row(recipe, row, w, g, 0, y, dw, nm_reference)


def test_jax_grad_of_a_loss_sr_ste(nm_reference):
  recipe = recipes.sr_ste("2:4", lambda_w=LAMBDA_W, **PHASES)
  w = _weights((3, 16), seed=4)
  x = _weights((16,), seed=5)

  def loss(w, step):
    return jnp.sum(sparsify(w, recipe, step, axis=1) @ x)

  phi = nm_reference(w, 2, 4, 1)
  g = np.broadcast_to(np.asarray(x), w.shape)
  np.testing.assert_allclose(
    jax.grad(loss)(w, 40), g + LAMBDA_W * (1 - phi) * np.asarray(w), rtol=1e-6
  )
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(w, 90), g * phi, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(loss)(w, 5), g, rtol=1e-6)


@pytest.mark.parametrize(
  ("recipe", "table"), [RECIPES[i][1:] for i in (3, 9)], ids=[RECIPE_IDS[i] for i in (3, 9)]
)
def test_multi_axis_kernel(recipe, table, nm_reference):
  # An attention out kernel (heads=4, head_dim=16, embed=3), contraction over (heads, head_dim).
  w = _weights((4, 16, 3), seed=6)
  g = _weights((4, 16, 3), seed=7)
  f = jax.jit(functools.partial(_forward_and_grad, recipe, (0, 1)))
  for row in table:
    y, dw = f(w, row[0], g)
    _check_row(recipe, row, w, g, (0, 1), y, dw, nm_reference)


@pytest.mark.parametrize(("recipe", "table"), [r[1:] for r in RECIPES[1:]], ids=RECIPE_IDS[1:])
def test_bfloat16_stays_bfloat16(recipe, table, nm_reference):
  w = _weights(dtype=jnp.bfloat16, seed=8)
  g = _weights(dtype=jnp.bfloat16, seed=9)
  f = jax.jit(functools.partial(_forward_and_grad, recipe, 0))
  for row in table[1::2]:
    y, dw = f(w, row[0], g)
    assert y.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    _check_row(recipe, row, w, g, 0, y, dw, nm_reference, rtol=2.0**-7, atol=2.0**-6)


@pytest.mark.parametrize(
  ("recipe", "table", "axis_size"),
  [(r[1], r[2], 64) for r in RECIPES if r[0] in ("mdgf_linear", "sdgf_stepwise", "sdgf_geometric")]
  + [
    (
      recipes.sdgf_geometric("1:8", total_steps=1000, dense_steps=100, fine_tune_steps=200),
      None,
      128,
    )
  ],
  ids=["mdgf_linear", "sdgf_stepwise", "sdgf_geometric", "sdgf_geometric-1:8-T1000"],
)
def test_no_recompilation_across_every_step(recipe, table, axis_size, group_counts):
  """A jitted function of (w, step) traces once over all phases, intervals and decay values."""
  w = _weights((axis_size, 2), seed=10)
  traces = 0

  @jax.jit
  def f(w, step):
    nonlocal traces
    traces += 1
    return sparsify(w, recipe, step)

  total = recipe.total_steps
  outputs = [f(w, step) for step in range(total + 2)]
  assert traces == 1
  # Nothing is pruned in the dense phase, everything follows the target from T - s on.
  assert np.array_equal(outputs[0], w) and np.array_equal(outputs[recipe.dense_steps - 1], w)
  n, m = recipe.nm
  for step in (total - recipe.fine_tune_steps, total + 1):
    assert (group_counts(outputs[step], m, 0) == n).all()
  # Traced steps of one dtype: the same single trace.
  for step in (0, total // 2, total):
    f(w, jnp.int32(step))
  assert traces == 2


def test_sdgf_geometric_reduced_k_follows_the_table(group_counts):
  # Contraction axis of 32: k = 16 (16:64) does not fit, the schedule starts at k = 8 (8:32)
  # with 4 intervals of 70 / 4 steps: [10, 28) 8:32, [28, 45) 4:16, [45, 63) 2:8, [63, 80) 1:4.
  recipe = recipes.sdgf_geometric("1:4", **PHASES)
  w = _weights((32, 3), seed=11)
  with pytest.warns(UserWarning, match=r"starting at k=8 instead of k=16"):
    f = jax.jit(lambda w, step: sparsify(w, recipe, step))
    f(w, 0)
  for step, (n, m) in [(10, (8, 32)), (27, (8, 32)), (28, (4, 16)), (45, (2, 8)), (63, (1, 4))]:
    assert (group_counts(f(w, step), m, 0) == n).all(), step


def test_sparsify_docstring_example():
  r = recipes.mdgf_linear("1:2", total_steps=10, beta=0.25)
  w = jnp.array([[1.0, -4.0], [-2.0, 3.0]])
  np.testing.assert_array_equal(sparsify(w, r, 2), [[0.5, -4.0], [-2.0, 1.5]])


@pytest.mark.parametrize(
  ("w", "recipe", "axis", "match"),
  [
    (jnp.ones((8, 2), jnp.int32), recipes.ste("1:4"), 0, r"floating-point weight, got dtype int32"),
    (jnp.ones((8, 2)), recipes.ste("1:4"), 2, r"axis 2 is out of range for an array of rank 2"),
    (jnp.ones((8, 2, 2)), recipes.ste("1:4"), (0, 2), r"must name distinct, adjacent axes"),
    (jnp.ones((6, 2)), recipes.ste("1:4"), 0, r"contraction axis has size 6, not divisible by m=4"),
    (jnp.ones((8, 2)), recipes.ste(), 0, r"recipe ste has no target N:M"),
    (
      jnp.ones((64, 2)),
      recipes.sdgf_geometric("1:8", total_steps=100, fit_k="error"),
      0,
      r"SDGF-Geometric pattern 16:128 does not fit the contraction axis of size 64",
    ),
    (
      jnp.ones((8, 2)),
      recipes.sdgf_stepwise("1:8", total_steps=3),
      0,
      r"needs at least one step per pattern",
    ),
  ],
)
def test_bad_input(w, recipe, axis, match):
  with pytest.raises(ValueError, match=match):
    sparsify(w, recipe, 0, axis=axis)

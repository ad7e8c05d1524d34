"""Recipes against hand-computed tables from the paper (§3): patterns, intervals, phases, D(j)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import NM, recipes
from nm_sparse_jax.recipes import DENSE, FINE_TUNE, SPARSIFY


def _strs(patterns):
  return [str(p) for p in patterns]


# ---- Pattern sequences. --------------------------------------------------------------------------


def test_sdgf_stepwise_1_8_sequence_from_the_paper():
  r = recipes.sdgf_stepwise("1:8", total_steps=1000)
  assert r.patterns() == (NM(7, 8), NM(4, 8), NM(2, 8), NM(1, 8))
  assert r.patterns(64) == r.patterns()


def test_sdgf_geometric_1_8_sequence_from_the_paper():
  r = recipes.sdgf_geometric("1:8", total_steps=1000)
  assert r.k == 16
  assert _strs(r.patterns(1024)) == ["16:128", "8:64", "4:32", "2:16", "1:8"]
  assert _strs(r.patterns()) == ["16:128", "8:64", "4:32", "2:16", "1:8"]


@pytest.mark.parametrize(
  ("nm", "expected"),
  [
    ("1:16", ["15:16", "8:16", "4:16", "2:16", "1:16"]),
    ("2:8", ["7:8", "4:8", "2:8"]),
    ("2:4", ["3:4", "2:4"]),
    ("1:4", ["3:4", "2:4", "1:4"]),
    ("1:2", ["1:2"]),
    ("7:8", ["7:8"]),
    # M/N not a power of two (module docstring): integer halving, stopping before <= N.
    ("3:8", ["7:8", "4:8", "3:8"]),
    ("1:6", ["5:6", "3:6", "1:6"]),
    ("5:16", ["15:16", "8:16", "5:16"]),
    ("3:12", ["11:12", "6:12", "3:12"]),
  ],
)
def test_sdgf_stepwise_sequences(nm, expected):
  assert _strs(recipes.sdgf_stepwise(nm, total_steps=1000).patterns()) == expected


@pytest.mark.parametrize(
  ("nm", "k", "expected"),
  [
    ("2:4", 4, ["8:16", "4:8", "2:4"]),
    ("1:4", 1, ["1:4"]),
    ("1:32", 2, ["2:64", "1:32"]),
  ],
)
def test_sdgf_geometric_sequences(nm, k, expected):
  assert _strs(recipes.sdgf_geometric(nm, total_steps=1000, k=k).patterns()) == expected


@pytest.mark.parametrize(
  ("axis_size", "k", "expected"),
  [
    (64, 8, ["8:64", "4:32", "2:16", "1:8"]),
    (96, 4, ["4:32", "2:16", "1:8"]),
    (48, 2, ["2:16", "1:8"]),
    (24, 1, ["1:8"]),
  ],
)
def test_sdgf_geometric_reduces_k_with_a_warning(axis_size, k, expected):
  r = recipes.sdgf_geometric("1:8", total_steps=1000)
  with pytest.warns(
    UserWarning,
    match=rf"w: SDGF-Geometric pattern 16:128 does not fit the "
    rf"contraction axis of size {axis_size}; starting at k={k} instead of k=16",
  ):
    assert _strs(r.patterns(axis_size, where="w")) == expected


def test_sdgf_geometric_fit_k_error():
  r = recipes.sdgf_geometric("1:8", total_steps=1000, fit_k="error")
  assert _strs(r.patterns(256)) == ["16:128", "8:64", "4:32", "2:16", "1:8"]  # fits: no warning
  with pytest.raises(
    ValueError,
    match=r"w: SDGF-Geometric pattern 16:128 does not fit the "
    r"contraction axis of size 64 \(fit_k='error'\)",
  ):
    r.patterns(64, where="w")


def test_other_recipes_use_the_target_only():
  for name in ("ste", "sr_ste", "mdgf_linear", "mdgf_exponential"):
    assert recipes.get(name, nm="2:4", total_steps=10).patterns(8) == (NM(2, 4),)
  assert recipes.dense("2:4", total_steps=10).patterns(8) == ()
  assert recipes.dense().patterns() == ()


# ---- Intervals and phases. -----------------------------------------------------------------------

# T = 1000, d = 100, s = 200: sparsification phase [100, 800) of L = 700 steps.
# SDGF-Stepwise 1:8, 4 intervals of 175 steps:
#   [100, 275) 7:8, [275, 450) 4:8, [450, 625) 2:8, [625, 800) 1:8, fine-tune 1:8 from 800.
# mask_branch: 0 = dense (all ones), i + 1 = pattern i, 4 = the target in the fine-tune phase.
STEPWISE_TABLE = [
  # step, phase, interval, mask branch, pattern
  (0, DENSE, 0, 0, None),
  (99, DENSE, 0, 0, None),
  (100, SPARSIFY, 0, 1, "7:8"),
  (274, SPARSIFY, 0, 1, "7:8"),
  (275, SPARSIFY, 1, 2, "4:8"),
  (449, SPARSIFY, 1, 2, "4:8"),
  (450, SPARSIFY, 2, 3, "2:8"),
  (624, SPARSIFY, 2, 3, "2:8"),
  (625, SPARSIFY, 3, 4, "1:8"),
  (799, SPARSIFY, 3, 4, "1:8"),
  (800, FINE_TUNE, 3, 4, "1:8"),
  (999, FINE_TUNE, 3, 4, "1:8"),
  (1000, FINE_TUNE, 3, 4, "1:8"),
  (10**6, FINE_TUNE, 3, 4, "1:8"),
]

# SDGF-Geometric 1:8 (k = 16), same phases, 5 intervals of 140 steps:
#   [100, 240) 16:128, [240, 380) 8:64, [380, 520) 4:32, [520, 660) 2:16, [660, 800) 1:8.
GEOMETRIC_TABLE = [
  (99, DENSE, 0, 0, None),
  (100, SPARSIFY, 0, 1, "16:128"),
  (239, SPARSIFY, 0, 1, "16:128"),
  (240, SPARSIFY, 1, 2, "8:64"),
  (379, SPARSIFY, 1, 2, "8:64"),
  (380, SPARSIFY, 2, 3, "4:32"),
  (519, SPARSIFY, 2, 3, "4:32"),
  (520, SPARSIFY, 3, 4, "2:16"),
  (659, SPARSIFY, 3, 4, "2:16"),
  (660, SPARSIFY, 4, 5, "1:8"),
  (799, SPARSIFY, 4, 5, "1:8"),
  (800, FINE_TUNE, 4, 5, "1:8"),
]


def _check_table(recipe, table, axis_size):
  patterns = recipe.patterns(axis_size)
  steps = jnp.array([row[0] for row in table], jnp.int32)
  phases = jax.vmap(recipe.phase)(steps)
  intervals = jax.vmap(lambda j: recipe.interval(j, len(patterns)))(steps)
  branches = jax.vmap(lambda j: recipe.mask_branch(j, len(patterns)))(steps)
  for row, phase, interval, branch in zip(table, phases, intervals, branches, strict=True):
    step, want_phase, want_interval, want_branch, want_pattern = row
    assert (int(phase), int(interval), int(branch)) == (want_phase, want_interval, want_branch), (
      f"step {step}"
    )
    got = None if branch == 0 else str(patterns[int(branch) - 1])
    assert got == want_pattern, f"step {step}"


def test_sdgf_stepwise_interval_table():
  r = recipes.sdgf_stepwise("1:8", total_steps=1000, dense_steps=100, fine_tune_steps=200)
  assert r.sparsification_steps == 700
  _check_table(r, STEPWISE_TABLE, 64)


def test_sdgf_geometric_interval_table():
  r = recipes.sdgf_geometric("1:8", total_steps=1000, dense_steps=100, fine_tune_steps=200)
  _check_table(r, GEOMETRIC_TABLE, 1024)


def test_uneven_intervals_differ_by_at_most_one_step():
  # L = 10 steps, 4 patterns: j' in [ceil(10 i / 4), ceil(10 (i + 1) / 4)): lengths 3, 2, 3, 2.
  r = recipes.sdgf_stepwise("1:8", total_steps=10)
  intervals = [int(r.interval(j, 4)) for j in range(10)]
  assert intervals == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_sdgf_one_step_per_pattern():
  r = recipes.sdgf_stepwise("1:8", total_steps=7, dense_steps=1, fine_tune_steps=2)  # L = 4
  assert [int(r.mask_branch(j, 4)) for j in range(8)] == [0, 1, 2, 3, 4, 4, 4, 4]


@pytest.mark.parametrize(
  ("factory", "kwargs", "table"),
  [
    # d = 10, s = 20, T = 100: dense [0, 10), sparsify [10, 80), fine-tune [80, ...).
    ("mdgf_linear", {"beta": 0.01}, [(9, 0), (10, 1), (79, 1), (80, 2), (100, 2)]),
    ("sdgf_stepwise", {}, [(0, 0), (9, 0), (10, 1), (79, 1), (80, 2), (99, 2)]),
    ("sr_ste", {}, [(9, 0), (10, 1), (79, 1), (80, 2)]),
  ],
)
def test_phase_boundaries(factory, kwargs, table):
  r = recipes.get(factory, nm="1:4", total_steps=100, dense_steps=10, fine_tune_steps=20, **kwargs)
  assert [int(r.phase(j)) for j, _ in table] == [p for _, p in table]


def test_phase_boundaries_without_dense_or_fine_tune():
  r = recipes.mdgf_linear("1:4", total_steps=100, beta=0.1)
  assert [int(r.phase(j)) for j in (0, 99, 100)] == [SPARSIFY, SPARSIFY, FINE_TUNE]
  r = recipes.sr_ste("2:4", dense_steps=10_000)  # no total: never fine-tunes ("10K dense")
  assert [int(r.phase(j)) for j in (9_999, 10_000, 10**9)] == [DENSE, SPARSIFY, SPARSIFY]
  assert recipes.ste("2:4").sparsification_steps is None


# ---- D(j). ------------------------------------------------------------------------------------


def _decays(recipe, steps):
  return np.array([float(recipe.decay(j)) for j in steps])


def test_mdgf_linear_decay_values():
  # T = 1000, d = 100, s = 200, beta = 0.002: D = max(1 - 0.002 (j - 100), 0) in [100, 800).
  r = recipes.mdgf_linear("1:8", total_steps=1000, dense_steps=100, fine_tune_steps=200, beta=2e-3)
  steps = [0, 99, 100, 101, 350, 500, 599, 600, 700, 799, 800, 999]
  want = [1.0, 1.0, 1.0, 0.998, 0.5, 0.2, 0.002, 0.0, 0.0, 0.0, 0.0, 0.0]
  np.testing.assert_allclose(_decays(r, steps), want, rtol=1e-5, atol=1e-6)


def test_mdgf_exponential_decay_values():
  # beta = 0.01: D = exp(-0.01 (j - 100)) in [100, 800), 0 from the fine-tune phase on.
  r = recipes.mdgf_exponential(
    "1:8", total_steps=1000, dense_steps=100, fine_tune_steps=200, beta=0.01
  )
  steps = [50, 99, 100, 200, 300, 799, 800, 900]
  want = [1.0, 1.0, 1.0, math.exp(-1), math.exp(-2), math.exp(-6.99), 0.0, 0.0]
  np.testing.assert_allclose(_decays(r, steps), want, rtol=1e-5, atol=0)


def test_mdgf_beta_from_decay_end_as_step_and_fraction():
  # decay_end 600 (a step) or 0.6 (a fraction of T = 1000), d = 100: 500 steps of decay.
  for end in (600, 0.6):
    lin = recipes.mdgf_linear("1:8", total_steps=1000, dense_steps=100, decay_end=end)
    assert lin.beta == pytest.approx(1 / 500)
    np.testing.assert_allclose(
      _decays(lin, [100, 350, 599, 600, 900]), [1.0, 0.5, 0.002, 0.0, 0.0], rtol=1e-4, atol=1e-6
    )
    exp = recipes.mdgf_exponential("1:8", total_steps=1000, dense_steps=100, decay_end=end)
    assert exp.beta == pytest.approx(math.log(1000) / 500)
    np.testing.assert_allclose(
      _decays(exp, [100, 350, 600]), [1.0, math.sqrt(1e-3), 1e-3], rtol=1e-4
    )
  # The paper's recommendation, D = 0 at 70% of training.
  lin = recipes.mdgf_linear("1:16", total_steps=1000, dense_steps=100, decay_end=0.7)
  assert lin.beta == pytest.approx(1 / 600)
  np.testing.assert_allclose(_decays(lin, [400, 700]), [0.5, 0.0], atol=1e-6)
  # Default: the end of the sparsification phase, T - s.
  lin = recipes.mdgf_linear("1:8", total_steps=1000, dense_steps=100, fine_tune_steps=200)
  assert lin.beta == pytest.approx(1 / 700)
  exp = recipes.mdgf_exponential("1:8", total_steps=1000, fine_tune_steps=200)
  assert exp.beta == pytest.approx(math.log(1000) / 800)
  # decay_end = T is allowed.
  assert recipes.mdgf_linear(total_steps=10, decay_end=10).beta == pytest.approx(0.1)


def test_decay_of_sdgf_and_ste():
  for name in ("sdgf_stepwise", "sdgf_geometric", "ste", "sr_ste"):
    r = recipes.get(name, nm="1:4", total_steps=100, dense_steps=10, fine_tune_steps=20)
    np.testing.assert_array_equal(_decays(r, [0, 9, 10, 50, 80]), [1, 1, 0, 0, 0])


def test_gradient_and_refine_schedules():
  r = recipes.sr_ste("1:4", lambda_w=0.5, total_steps=100, dense_steps=10, fine_tune_steps=20)
  assert [bool(r.straight_through(j)) for j in (9, 10, 79, 80)] == [False, True, True, False]
  assert [float(r.refine(j)) for j in (9, 10, 79, 80)] == [0.0, 0.5, 0.5, 0.0]
  m = recipes.mdgf_linear("1:4", total_steps=100, gradient="straight_through")
  assert [bool(m.straight_through(j)) for j in (0, 50, 100)] == [True, True, True]
  m = recipes.mdgf_linear("1:4", total_steps=100)
  assert [bool(m.straight_through(j)) for j in (0, 50, 100)] == [False, False, False]
  assert float(m.refine(50)) == 0.0


# ---- Configuration by name. ----------------------------------------------------------------------


@pytest.mark.parametrize("name", recipes.RECIPE_NAMES)
def test_get_by_name(name):
  kwargs = {"nm": "2:4", "total_steps": 100, "dense_steps": 10, "fine_tune_steps": 20}
  r = recipes.get(name, **kwargs)
  assert r == getattr(recipes, name)(**kwargs)
  assert (r.name, r.nm, r.total_steps, r.dense_steps, r.fine_tune_steps) == (
    name,
    NM(2, 4),
    100,
    10,
    20,
  )
  assert r.lambda_w == (2e-4 if name == "sr_ste" else 0.0)


def test_get_passes_factory_options():
  assert recipes.get("mdgf_linear", nm="1:8", total_steps=100, beta=0.25).beta == 0.25
  assert recipes.get("sdgf_geometric", nm="1:8", total_steps=100, k=4).k == 4
  assert recipes.get("sr_ste", nm="1:8", lambda_w=1e-3).lambda_w == 1e-3
  assert recipes.get("sr_ste", lambda_w=0).name == "ste"
  st = recipes.get("sdgf_stepwise", total_steps=10, gradient="straight_through")
  assert st.gradient == "straight_through" and st.nm is None
  assert st.with_nm("1:4").nm == NM(1, 4) and str(st.with_nm((1, 4))) == "sdgf_stepwise(1:4)"


def test_recipes_are_immutable():
  r = recipes.ste("1:4")
  with pytest.raises(AttributeError):
    r.nm = NM(2, 4)


# ---- Bad input. ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("name", "kwargs", "match"),
  [
    ("mdgf", {}, r"unknown recipe 'mdgf'; known recipes: dense, ste, sr_ste, mdgf_linear"),
    ("SR-STE", {}, r"unknown recipe 'SR-STE'"),
    # d + s > T.
    (
      "mdgf_linear",
      {"total_steps": 100, "dense_steps": 60, "fine_tune_steps": 50},
      r"dense_steps \+ fine_tune_steps = 60 \+ 50 exceeds total_steps=100",
    ),
    (
      "sdgf_stepwise",
      {"total_steps": 10, "dense_steps": 11},
      r"dense_steps \+ fine_tune_steps = 11 \+ 0 exceeds total_steps=10",
    ),
    ("sr_ste", {"total_steps": 10, "fine_tune_steps": 11}, r"11 exceeds total_steps=10"),
    ("dense", {"total_steps": 10, "dense_steps": 8, "fine_tune_steps": 3}, r"exceeds total_steps"),
    # Negative or non-integer phases.
    ("mdgf_exponential", {"total_steps": 100, "dense_steps": -1}, r"dense_steps=-1 must be >= 0"),
    (
      "sdgf_geometric",
      {"total_steps": 100, "fine_tune_steps": -5},
      r"fine_tune_steps=-5 must be >= 0",
    ),
    ("ste", {"dense_steps": -3}, r"dense_steps=-3 must be >= 0"),
    ("sdgf_stepwise", {"total_steps": 0}, r"total_steps=0 must be >= 1"),
    ("sdgf_stepwise", {"total_steps": 10.5}, r"total_steps=10.5 must be an integer"),
    ("mdgf_linear", {"total_steps": 100, "dense_steps": True}, r"dense_steps=True must be an int"),
    ("mdgf_linear", {"total_steps": None}, r"total_steps is required"),
    ("sr_ste", {"fine_tune_steps": 5}, r"total_steps is required"),
    # beta <= 0, beta with decay_end.
    ("mdgf_linear", {"total_steps": 100, "beta": 0.0}, r"beta=0.0 must be > 0"),
    ("mdgf_exponential", {"total_steps": 100, "beta": -0.1}, r"beta=-0.1 must be > 0"),
    ("mdgf_linear", {"total_steps": 100, "beta": float("nan")}, r"beta=nan must be > 0"),
    ("mdgf_linear", {"total_steps": 100, "beta": 0.1, "decay_end": 50}, r"not both"),
    # decay_end outside (d, T].
    (
      "mdgf_linear",
      {"total_steps": 1000, "dense_steps": 100, "decay_end": 100},
      r"decay_end=100 must lie after the dense phase \(dense_steps=100\)",
    ),
    (
      "mdgf_exponential",
      {"total_steps": 1000, "dense_steps": 100, "decay_end": 50},
      r"decay_end=50 must lie after the dense phase",
    ),
    (
      "mdgf_linear",
      {"total_steps": 1000, "decay_end": 1001},
      r"decay_end=1001 must lie .* at most at total_steps=1000",
    ),
    (
      "mdgf_linear",
      {"total_steps": 1000, "dense_steps": 100, "decay_end": 0.05},
      r"decay_end=50 must lie after the dense phase",
    ),
    (
      "mdgf_linear",
      {"total_steps": 1000, "decay_end": 0.0},
      r"decay_end=0.0 as a fraction of total_steps must be in \(0, 1\]",
    ),
    (
      "mdgf_exponential",
      {"total_steps": 1000, "decay_end": 1.5},
      r"decay_end=1.5 as a fraction of total_steps must be in \(0, 1\]",
    ),
    (
      "mdgf_linear",
      {"total_steps": 100, "dense_steps": 50, "fine_tune_steps": 50},
      r"decay_end=50 must lie after the dense phase",
    ),
    # Gradient option.
    (
      "mdgf_linear",
      {"total_steps": 100, "gradient": "ste"},
      r"gradient='ste' must be one of \('autodiff', 'straight_through'\)",
    ),
    ("sdgf_geometric", {"total_steps": 100, "gradient": None}, r"gradient=None must be one of"),
    # SDGF-Geometric and SR-STE options.
    ("sdgf_geometric", {"total_steps": 100, "k": 0}, r"k=0 must be >= 1"),
    ("sdgf_geometric", {"total_steps": 100, "k": 12}, r"k=12 must be a power of two"),
    (
      "sdgf_geometric",
      {"total_steps": 100, "fit_k": "drop"},
      r"fit_k='drop' must be 'reduce' or 'error'",
    ),
    ("sr_ste", {"lambda_w": -1e-4}, r"lambda_w=-0.0001 must be >= 0"),
    # Bad N:M strings.
    ("sr_ste", {"nm": "1/8"}, r"nm='1/8' is not an N:M pattern such as '1:8'"),
    ("mdgf_linear", {"nm": "1:8:16", "total_steps": 10}, r"nm='1:8:16' is not an N:M pattern"),
    ("sdgf_stepwise", {"nm": "8:8", "total_steps": 10}, r"nm=8:8 breaks 1 <= n < m"),
    ("sdgf_geometric", {"nm": "0:4", "total_steps": 10}, r"nm=0:4 breaks 1 <= n < m"),
    ("ste", {"nm": "two:four"}, r"nm='two:four' is not an N:M pattern"),
    ("dense", {"nm": (1, 8, 2)}, r"nm=\(1, 8, 2\) is not an N:M pattern"),
  ],
)
def test_bad_input(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    recipes.get(name, **kwargs)


def test_sdgf_phase_shorter_than_its_patterns():
  # L = 10 - 4 - 3 = 3 steps for the 4 patterns 7:8, 4:8, 2:8, 1:8.
  r = recipes.sdgf_stepwise("1:8", total_steps=10, dense_steps=4, fine_tune_steps=3)
  with pytest.raises(
    ValueError,
    match=r"w: sdgf_stepwise needs at least one step per pattern, but its sparsification phase "
    r"has 3 steps for 4 patterns \(7:8, 4:8, 2:8, 1:8\)",
  ):
    r.patterns(where="w")
  r = recipes.sdgf_geometric("1:8", total_steps=10, dense_steps=3, fine_tune_steps=3)  # L = 4
  with pytest.raises(ValueError, match=r"sdgf_geometric needs at least one step per pattern"):
    r.patterns(128)
  with pytest.warns(UserWarning, match=r"starting at k=4"):  # 4 patterns fit in 4 steps
    assert len(r.patterns(32)) == 3


def test_patterns_bad_input():
  with pytest.raises(ValueError, match=r"w: recipe mdgf_linear has no target N:M"):
    recipes.mdgf_linear(total_steps=10).patterns(where="w")
  with pytest.raises(ValueError, match=r"w: contraction axis has size 12, not divisible by m=8"):
    recipes.ste("1:8").patterns(12, where="w")

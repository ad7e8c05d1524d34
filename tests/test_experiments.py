"""The comparison runner, its reports, and training FLOPs against hand-computed references."""

import json

import jax
import numpy as np
import pytest

from nm_sparse_jax import experiments as ex
from nm_sparse_jax import policy as nmp
from nm_sparse_jax import recipes
from nm_sparse_jax.training_flops import kernel_densities, training_flops

# ---- Training FLOPs. ---------------------------------------------------------------------------

PARAMS = {
  "ff": {"kernel": np.zeros((16, 8))},
  "attn": {"kernel": np.zeros((8, 8))},
  "norm": {"scale": np.zeros(8)},
}


def _reference(recipe_name, steps, d, s):
  """Per-step (rho_fwd, rho_grad) of a 1:8 kernel, written out by hand from the definitions."""
  fwd, grad = [], []
  length = steps - d - s
  for j in range(steps):
    if j < d:
      fwd.append(1.0), grad.append(1.0)
    elif j >= steps - s:
      fwd.append(1 / 8), grad.append(1 / 8)
    elif recipe_name == "sr_ste":
      fwd.append(1 / 8), grad.append(1.0)
    elif recipe_name == "mdgf_exponential":  # D > 0 until the fine-tune phase
      fwd.append(1.0), grad.append(1.0)
    elif recipe_name == "mdgf_linear":  # D reaches 0 at decay_end = T - s
      fwd.append(1.0), grad.append(1.0)
    elif recipe_name == "sdgf_stepwise":  # 7:8, 4:8, 2:8, 1:8; only kept weights get gradients
      density = [7 / 8, 4 / 8, 2 / 8, 1 / 8][(j - d) * 4 // length]
      fwd.append(density), grad.append(density)
  return np.array(fwd), np.array(grad)


@pytest.mark.parametrize("name", ["sr_ste", "mdgf_exponential", "mdgf_linear", "sdgf_stepwise"])
def test_training_flops_match_hand_reference(name):
  steps, d, s = 24, 3, 5
  recipe = recipes.get(name, total_steps=steps, dense_steps=d, fine_tune_steps=s)
  policy = nmp.Policy([nmp.Rule("ff/kernel", "1:8")], recipe)
  report = training_flops(PARAMS, policy, steps=steps, tokens=3, extra_dense_flops=10.0)
  ff, attn = 2 * 3 * 16 * 8, 2 * 3 * 8 * 8
  rho_fwd, rho_grad = _reference(name, steps, d, s)
  np.testing.assert_allclose(report.forward, rho_fwd * ff + attn + 10.0)
  np.testing.assert_allclose(report.backward, (rho_fwd + rho_grad) * ff + 2 * attn + 20.0)
  assert report.dense_step == 3 * (ff + attn + 10.0)
  phases = report.by_phase(batch=2)
  assert phases["dense"] == pytest.approx(2 * report.per_step[:d].sum())
  assert phases["fine_tune"] == pytest.approx(2 * report.per_step[steps - s :].sum())
  assert sum(phases.values()) == pytest.approx(report.total(batch=2))
  np.testing.assert_allclose(report.cumulative(2)[-1], report.total(2))


def test_training_flops_straight_through_and_dense():
  steps = 10
  recipe = recipes.sdgf_stepwise("1:4", total_steps=steps, gradient="straight_through")
  rho_fwd, rho_grad = kernel_densities(recipe, recipe.patterns(), steps)
  np.testing.assert_allclose(rho_grad, 1.0)  # straight-through: every weight gets g
  assert rho_fwd[0] == 3 / 4 and rho_fwd[-1] == 1 / 4
  dense = training_flops(PARAMS, None, steps=steps, tokens=1)
  np.testing.assert_allclose(dense.per_step, dense.dense_step)
  assert set(dense.phase.tolist()) == {recipes.DENSE}
  with pytest.raises(ValueError, match="steps=0 must be >= 1"):
    training_flops(PARAMS, None, steps=0, tokens=1)


# ---- Targets, settings, tables. --------------------------------------------------------------


@pytest.mark.parametrize(
  "spec, match",
  [
    ("ff", "is not GROUP=N:M"),
    ("ff=8:1", "breaks 1 <= n < m"),
    ("", "names no layer group"),
  ],
)
def test_parse_target_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    ex.parse_target(spec)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"steps": 0}, "steps=0 must be >= 1"),
    ({"dense_fraction": 0.5, "fine_tune_fraction": 0.5}, "leaves no sparsification phase"),
    ({"warmup_fraction": 1.5}, "warmup_fraction=1.5 must be in"),
    ({"gradient": "ste"}, "gradient='ste' must be one of"),
  ],
)
def test_settings_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ex.Settings(**kwargs)


def test_settings_match_saved_runs():
  saved = dict(vars(ex.Settings(steps=50)))
  del saved["gradient"]  # a run saved before this setting existed counts as its default
  assert ex.Settings(steps=50).matches(saved)
  assert not ex.Settings(steps=60).matches(saved)
  assert not ex.Settings(steps=50, gradient="straight_through").matches(saved)


def _record(recipe, label, seed, accuracy):
  target = {"ff": label.split()[0]}
  return {
    "recipe": recipe,
    "label": label,
    "target": target,
    "seed": seed,
    "final_accuracy": accuracy,
  }


def test_accuracy_and_paired_tables_match_numpy():
  accs = {
    ("dense", 0): 0.90,
    ("dense", 1): 0.88,
    ("sr_ste", 0): 0.80,
    ("sr_ste", 1): 0.84,
    ("sr_ste", 2): 0.82,
    ("mdgf_exponential", 0): 0.83,
    ("mdgf_exponential", 1): 0.86,
    ("mdgf_exponential", 2): 0.86,
  }
  runs = [_record(r, "1:32 (FF)", s, a) for (r, s), a in accs.items()]
  table = ex.accuracy_table(runs)
  sr = np.array([80.0, 84.0, 82.0])
  assert f"{sr.mean():.2f} ± {sr.std(ddof=1):.2f} (n=3)" in table
  md = np.array([83.0, 86.0, 86.0])
  assert f"**{md.mean():.2f} ± {md.std(ddof=1):.2f} (n=3)**" in table  # best sparse recipe
  assert "89.00 ± 1.41 (n=2)" in table  # dense, shown in every row
  paired = ex.paired_table(runs)
  diff = md - sr
  assert f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}" in paired
  # Differences 3, 2, 4: mean 3 > max(2 * 1 / sqrt(3), SR-STE's seed std 2), so it is marked.
  assert "+3.00 ± 1.00 (> spread)" in paired
  close = [dict(r, final_accuracy=0.815) if r["recipe"] == "mdgf_exponential" else r for r in runs]
  assert "(> spread)" not in ex.paired_table(close)


# ---- The runner end to end (tiny ViT on digits), through the command line. -------------------


@pytest.fixture
def _standard_promotion():
  # The runner is user-level code (optax's Adam needs JAX's default promotion rules).
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


@pytest.mark.usefixtures("_standard_promotion")
def test_compare_cli_writes_tables_plots_and_json(tmp_path, monkeypatch, capsys):
  pytest.importorskip("sklearn", reason="the digits task needs scikit-learn")
  from nm_sparse_jax.__main__ import main

  args = [
    "compare",
    "--task=digits",
    "--recipes=dense,sr_ste,sdgf_stepwise",
    "--targets",
    "ff=1:4",
    "--seeds=0,1",
    "--steps=12",
    "--batch=16",
    "--log-every=2",
    "--eval-every=6",
    "--eval-examples=64",
    "--hidden=16",
    "--mlp-dim=32",
    f"--out={tmp_path}",
    "--no-progress",
  ]
  main(args)
  printed = capsys.readouterr().out
  assert "| 1:4 (FF) |" in printed
  saved = json.loads((tmp_path / "results.json").read_text())
  runs = saved["runs"]
  assert len(runs) == 2 * 3  # dense once per seed
  assert saved["meta"]["wall_seconds"] > 0 and saved["meta"]["seeds"] == [0, 1]
  for run in runs:
    assert 0.0 <= run["final_accuracy"] <= 1.0
    assert [e[0] for e in run["eval"]] == [6, 12]
    assert run["eval"][0][1] < run["eval"][1][1] == pytest.approx(run["training_flops"]["total"])
    assert run["curves"]["step"] == [0, 2, 4, 6, 8, 10, 11]
    assert {"ff/nu_var", "ff/grad_abs_var", "ff/flip_rate", "qkv/sparsity"} <= set(run["curves"])
    if run["recipe"] == "dense":
      assert run["verified"] is None and run["kernel_sparsity"] == 0.0
      assert run["training_flops"]["total"] == pytest.approx(run["dense_training_flops"])
    else:
      assert run["verified"] is True
      assert run["kernel_sparsity"] == pytest.approx(0.75)
      assert run["training_flops"]["total"] < run["dense_training_flops"]
      assert run["inference_flops"]["sparse"] < run["inference_flops"]["dense"]
      assert run["curves"]["ff/sparsity"][-1] == pytest.approx(0.75)
  stepwise = next(r for r in runs if r["recipe"] == "sdgf_stepwise")
  assert set(map(tuple, stepwise["patterns"].values())) == {("3:4", "2:4", "1:4")}
  md = (tmp_path / "results.md").read_text()
  accs = [100 * r["final_accuracy"] for r in runs if r["recipe"] == "sr_ste"]
  assert f"{np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f} (n=2)" in md
  figures = json.loads((tmp_path / "figures.json").read_text())
  assert set(figures) == {
    "diagnostics_1-4-ff_ff.png",
    "accuracy_vs_training_flops_1-4-ff.png",
    "accuracy_vs_inference_flops.png",
  }
  panels = figures["diagnostics_1-4-ff_ff.png"]["panels"]
  assert set(panels["nu_var"]["lines"]) == {"Dense", "SR-STE", "SDGF-Stepwise"}
  if pytest.importorskip("matplotlib", reason="plots need matplotlib"):
    for name in figures:
      assert 0 < (tmp_path / name).stat().st_size < 300_000

  # Resuming trains nothing new: every run is already in results.json.
  def fail(*args, **kwargs):
    raise AssertionError("resume retrained a finished run")

  monkeypatch.setattr("nm_sparse_jax.experiments._runner.train_one", fail)
  main(args + ["--resume", "--no-plots"])
  assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 6


def test_compare_rejects_bad_arguments():
  task = ex.Task(*(None,) * len(ex.Task._fields))
  with pytest.raises(ValueError, match="unknown recipes \\['srste'\\]"):
    ex.compare(task, recipe_names=["srste"], targets=["ff=1:8"], seeds=[0])
  with pytest.raises(ValueError, match="at least one seed"):
    ex.compare(task, recipe_names=["sr_ste"], targets=["ff=1:8"], seeds=[])
  with pytest.raises(ValueError, match="unknown task 'cifar'"):
    ex.make_task("cifar")

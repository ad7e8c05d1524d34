"""The main job (``python -m nm_sparse_jax demo``) on a tiny setting, and the CLI."""

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (the demo extra)")

from nm_sparse_jax.__main__ import main  # noqa: E402
from nm_sparse_jax.data.digits import load_digits  # noqa: E402
from nm_sparse_jax.demo import DemoConfig, run_demo  # noqa: E402
from nm_sparse_jax.models.vit import ViTConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _standard_promotion():
  # The demo is user-level code: run it with JAX's default promotion rules.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


def test_digits_split_is_stratified_and_offline():
  train, test = load_digits(seed=0)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.float32
  assert len(train.labels) + len(test.labels) == 1797
  assert 0.0 <= train.images.min() and train.images.max() <= 1.0
  assert set(np.unique(test.labels)) == set(range(10))


def test_demo_trains_verifies_and_reports(capsys):
  config = DemoConfig(
    recipe="sdgf_stepwise",
    ff="1:8",
    attention="1:4",
    steps=80,
    batch=32,
    model=ViTConfig(hidden=32, depth=1, heads=2, mlp_dim=128),
  )
  results = run_demo(config, baseline=True, progress=False)
  out = capsys.readouterr().out
  assert [r.recipe for r in results] == ["dense", "sdgf_stepwise"]
  dense, sparse = results
  assert dense.report is None and sparse.report.ok
  assert len(sparse.report.layers) == 5  # Dense_0, Dense_1, query, key, value
  assert sparse.flops.sparse < dense.flops.sparse == dense.flops.dense
  assert sparse.test_accuracy > 0.3  # 10 classes; chance is 0.1
  assert "N:M verification of the finalized sdgf_stepwise model" in out
  assert "FF 1:8 + QKV 1:4" in out and "5/5 ok" in out


def test_cli_demo_without_baseline(capsys):
  main(
    [
      "demo", "--recipe", "sr_ste", "--ff", "2:4", "--steps", "30", "--hidden", "32",
      "--depth", "1", "--heads", "2", "--batch", "16", "--no-baseline", "--no-progress",
    ]
  )  # fmt: skip
  out = capsys.readouterr().out
  assert "sr_ste" in out and "FF 2:4" in out and "2/2 ok" in out
  assert "\ndense " not in out


def test_cli_rejects_unknown_recipe(capsys):
  with pytest.raises(SystemExit):
    main(["demo", "--recipe", "mdgf_cubic"])
  assert "invalid choice" in capsys.readouterr().err

"""The sparse inference paths give a Flax model's numbers; the spmm benchmark runs and checks."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import finalize, recipes
from nm_sparse_jax import policy as nmp
from nm_sparse_jax import sparse_linear as sl
from nm_sparse_jax.bench import spmm as bench_spmm
from nm_sparse_jax.export import compress, export, to_bcsr
from nm_sparse_jax.kernels import SpmmConfig
from nm_sparse_jax.models.vit import VisionTransformer, ViTConfig

ON_GPU = jax.default_backend() == "gpu"


def _relerr(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(y - ref) / np.linalg.norm(ref)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
  """Float32 products in every path: XLA's GPU matmuls default to TF32 (~1e-3 relative error),
  which would hide (or fake) a 1e-5 disagreement between the paths."""
  with jax.default_matmul_precision("float32"):
    yield


@pytest.fixture(scope="module")
def vit():
  model = VisionTransformer(ViTConfig(hidden=32, depth=2, heads=2, mlp_dim=64))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  params = model.init(jax.random.key(0), images)["params"]
  # FF (Dense), query (DenseGeneral, one contracted axis), out (DenseGeneral, two).
  pol = nmp.vit(recipes.ste(), ff="1:4", q="2:4", o="1:8")
  hard = finalize(params, pol)
  with jax.default_matmul_precision("float32"):
    return model, images, pol, hard, model.apply({"params": hard}, images)


@pytest.mark.parametrize("fmt", ["nm", "bcsr"])
def test_vit_runs_on_exported_kernels(vit, fmt):
  model, images, pol, hard, dense = vit
  variables = {"params": export(hard, pol, format=fmt)}
  assert _relerr(sl.apply(model, variables, images), dense) < 1e-5
  assert _relerr(sl.jit_apply(model)(variables, images), dense) < 1e-5


def test_jit_apply_compiles_once_per_shape(vit):
  model, images, pol, hard, _ = vit
  variables = {"params": export(hard, pol, format="nm")}
  f = sl.jit_apply(model)
  f(variables, images)
  f(variables, images + 1.0)
  f(variables, images[:1])
  assert len(f.signatures) == 2
  assert [s[0].shape for s in f.signatures] == [images.shape, images[:1].shape]


@pytest.mark.parametrize("fmt", ["nm", "bcsr"])
def test_jit_apply_lower_is_what_it_runs(vit, fmt):
  """``jit_apply(...).lower`` compiles to the same numbers as the call; on a GPU the BCSR
  model's HLO calls cuSPARSE (the flag is on when the private jit lowers) and the nm model's
  calls the Pallas kernel."""
  model, images, pol, hard, dense = vit
  variables = {"params": export(hard, pol, format=fmt)}
  f = sl.jit_apply(model)
  compiled = f.lower(variables, images).compile()
  np.testing.assert_array_equal(np.asarray(compiled(variables, images)), f(variables, images))
  assert _relerr(compiled(variables, images), dense) < 1e-5
  if ON_GPU:
    hlo = compiled.as_text().lower()
    assert ("cusparse" in hlo) == (fmt == "bcsr")
    assert ("nm_matmul" in hlo) == (fmt == "nm")


def test_dense_bias_dtype_and_config():
  model = nn.Dense(8, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(2), (3, 16))
  params = model.init(jax.random.key(3), x)["params"]
  pol = nmp.Policy([nmp.Rule("kernel", "1:4")], recipes.ste())
  hard = finalize(params, pol)
  ref = model.apply({"params": hard}, x)
  for config in (None, SpmmConfig("dot", 8, 16, 16), SpmmConfig("gather", 4, 4, 4)):
    y = sl.apply(model, {"params": export(hard, pol)}, x, config=config)
    assert y.dtype == jnp.bfloat16 and y.shape == (3, 8)
    assert _relerr(y.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


def test_linear_paths_agree():
  w = jnp.where(
    jnp.arange(32)[:, None] % 4 == 1, jax.random.normal(jax.random.key(4), (32, 6)), 0.0
  )
  x = jax.random.normal(jax.random.key(5), (4, 32))
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert _relerr(sl.linear(x, compress(w, 1, 4)), ref) < 1e-6
  assert _relerr(sl.linear(x, to_bcsr(w, 1, 4)), ref) < 1e-6
  assert _relerr(sl.bcsr_matmul(x.astype(jnp.bfloat16), to_bcsr(w, 1, 4)), ref) < 1e-2
  with pytest.raises(TypeError, match="expected NMCompressed or BCSRKernel, got ArrayImpl"):
    sl.linear(x, w)
  with pytest.raises(ValueError, match="its last axis must be K=32"):
    sl.bcsr_matmul(x[:, :8], to_bcsr(w, 1, 4))


def test_jit_apply_leaves_a_set_cusparse_flag_alone(vit, monkeypatch):
  """With the flag already on, calls do not toggle it (so threads cannot race on it); without
  it, a call turns it on only for its duration."""
  model, images, pol, hard, dense = vit
  variables = {"params": export(hard, pol, format="bcsr")}
  f = sl.jit_apply(model)
  updates = []
  real_update = jax.config.update
  before = jax.config.jax_bcoo_cusparse_lowering
  real_update("jax_bcoo_cusparse_lowering", False)
  monkeypatch.setattr(jax.config, "update", lambda *a: (updates.append(a), real_update(*a)))
  try:
    assert _relerr(f(variables, images), dense) < 1e-5
    assert updates == [
      ("jax_bcoo_cusparse_lowering", True),
      ("jax_bcoo_cusparse_lowering", False),
    ]
    updates.clear()
    real_update("jax_bcoo_cusparse_lowering", True)
    assert _relerr(f(variables, images), dense) < 1e-5
    assert updates == []
  finally:
    real_update("jax_bcoo_cusparse_lowering", before)


def test_cusparse_flag_is_restored():
  before = jax.config.jax_bcoo_cusparse_lowering
  with sl.cusparse_lowering():
    assert jax.config.jax_bcoo_cusparse_lowering
  assert jax.config.jax_bcoo_cusparse_lowering == before


def test_unsupported_layouts_raise():
  class Middle(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(4, axis=1)(x)  # contracts a non-trailing axis

  x = jnp.ones((2, 8, 3))
  params = Middle().init(jax.random.key(0), x)["params"]
  pol = nmp.Policy([nmp.Rule("kernel", "1:4")], recipes.ste())
  exported = export(finalize(params, pol), pol)
  with pytest.raises(ValueError, match="contracted axes of x to be its last ones; got axis=1"):
    sl.apply(Middle(), {"params": exported}, x)


def test_spmm_benchmark_checks_every_path(tmp_path, capsys):
  out = tmp_path / "spmm.json"
  with jax.numpy_dtype_promotion("standard"):  # the end-to-end ViT runs in bf16 (LayerNorm)
    result = _run_bench(out)
  _check_bench(result, out, capsys.readouterr().out)


def _run_bench(out):
  return bench_spmm.main(
    ["--shapes", "64x32", "--tokens", "20", "--patterns", "2:4,1:8", "--paths", "dense,bcsr,nm",
     "--copies", "1", "--reps", "3", "--json", str(out), "--e2e", "--e2e-model", "tiny",
     "--e2e-patterns", "1:4", "--e2e-bcsr-patterns", "1:4"]
  )  # fmt: skip


def _check_bench(result, out, printed):
  records = result["records"]
  assert {(r["tokens"], r["path"], r["pattern"]) for r in records} == {
    (t, p, q) for t in (20,) for p, q in [("dense", "dense"), ("bcsr", "2:4"), ("bcsr", "1:8"),
                                            ("nm", "2:4"), ("nm", "1:8")]
  }  # fmt: skip
  assert all(r["ok"] and r["us"] > 0 for r in records)
  assert all(r["candidates"] for r in records if r["path"] == "nm")
  for r in records:  # on a GPU: each kernel's share of the product's GPU time
    assert (r["gpu_kernels_us"] is not None) == ON_GPU
    if ON_GPU:
      assert sum(r["gpu_kernels_us"].values()) == pytest.approx(r["gpu_us"])
  assert [(r["path"], r["pattern"]) for r in result["e2e"]] == [
    ("dense", "dense"), ("bcsr", "1:4"), ("nm", "1:4")
  ]  # fmt: skip
  assert all(r["relerr_vs_dense_masked"] < 2e-2 for r in result["e2e"][1:])  # bf16 model
  saved = json.loads(out.read_text())
  assert saved["records"] == records and "JAX" in saved["device"]
  assert "Table 19 form" in printed and "Table 8 form" in printed
  if not ON_GPU:
    assert "no GPU" in printed


def test_spmm_benchmark_saves_each_case_as_it_goes(tmp_path):
  # A run cut short (here by a second shape whose K is not a multiple of m) keeps the first
  # case's records.
  out = tmp_path / "spmm.json"
  with pytest.raises(ValueError):
    bench_spmm.main(
      ["--shapes", "64x32,30x32", "--tokens", "1", "--patterns", "2:4", "--paths", "dense,nm",
       "--copies", "1", "--reps", "1", "--json", str(out)]
    )  # fmt: skip
  saved = json.loads(out.read_text())
  cases = {(r["shape"], r["path"]) for r in saved["records"]}
  assert cases == {("64x32", "dense"), ("64x32", "nm")}
  assert all(r["ok"] for r in saved["records"])

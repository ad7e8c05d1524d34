"""Runs the README's quick start exactly as written and checks what it promises."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_code() -> str:
  text = README.read_text()
  section = text.split("## Quick start", 1)[1]
  match = re.search(r"```python\n(.*?)```", section, re.S)
  assert match, "README's quick start has no python block"
  return match.group(1)


@pytest.fixture(scope="module")
def quickstart():
  namespace = {"__name__": "quickstart"}
  # The quick start is user code: run it without the suite's strict promotion rules.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    exec(compile(_quickstart_code(), str(README), "exec"), namespace)
  return namespace


def test_loss_goes_down(quickstart):
  losses = np.array(quickstart["losses"])
  assert len(losses) == quickstart["steps"]
  assert losses[-30:].mean() < 0.5 * losses[:30].mean()


def test_selected_kernels_are_exactly_nm_along_the_input_axis(quickstart):
  params, policy = quickstart["params"], quickstart["policy"]
  report = quickstart["report"]
  assert report.ok
  selected = {layer.path: layer for layer in report.layers}
  # 2 blocks x (Dense_0, Dense_1 at 1:8 + query, key, value at 1:4).
  assert len(selected) == 10
  block = params["Transformer"]["encoderblock_0"]
  checks = [
    (block["MlpBlock_0"]["Dense_0"]["kernel"], 8, 1),
    (block["MlpBlock_0"]["Dense_1"]["kernel"], 8, 1),
    (block["MultiHeadDotProductAttention_0"]["query"]["kernel"], 4, 1),
  ]
  for kernel, m, n in checks:
    k = np.asarray(kernel)
    groups = k.reshape(k.shape[0] // m, m, -1)  # groups along axis 0, the input axis
    assert (np.count_nonzero(groups, axis=1) == n).all()
  assert policy.resolve(params)


def test_other_layers_are_untouched(quickstart):
  params = quickstart["params"]
  block = params["Transformer"]["encoderblock_1"]
  for kernel in (
    block["MultiHeadDotProductAttention_0"]["out"]["kernel"],
    params["head"]["kernel"],
    params["embedding"]["kernel"],
  ):
    assert np.count_nonzero(np.asarray(kernel)) == np.asarray(kernel).size


def test_trained_params_are_the_final_sparse_weights(quickstart):
  nmj = quickstart["nmj"]
  params, policy, steps = quickstart["params"], quickstart["policy"], quickstart["steps"]
  final = nmj.finalize(params, policy)
  at_end = policy.apply(params, jnp.int32(steps))
  for a, b, c in zip(
    jax.tree_util.tree_leaves(params),
    jax.tree_util.tree_leaves(final),
    jax.tree_util.tree_leaves(at_end),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  assert int(nmj.sparsity_step(quickstart["opt_state"])) == steps

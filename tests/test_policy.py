"""Policy resolve/apply on a T5X-like parameter tree and on the ViT of nm_sparse_jax.models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import NM, policy, recipes
from nm_sparse_jax.models import VisionTransformer, ViTConfig
from nm_sparse_jax.policy import Policy, Rule

EMBED, MLP, HEADS, HEAD_DIM = 32, 64, 4, 8


def _t5x_params(seed=0):
  """A T5X T5 1.1 parameter tree (2-D kernels (in, out)), one encoder and one decoder layer."""
  rng = np.random.default_rng(seed)

  def dense(shape):
    return {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}

  def attention():
    return {
      "query": dense((EMBED, EMBED)),
      "key": dense((EMBED, EMBED)),
      "value": dense((EMBED, EMBED)),
      "out": dense((EMBED, EMBED)),
    }

  def mlp():
    return {"wi_0": dense((EMBED, MLP)), "wi_1": dense((EMBED, MLP)), "wo": dense((MLP, EMBED))}

  def norm():
    return {"scale": jnp.ones((EMBED,), jnp.float32)}

  return {
    "token_embedder": {"embedding": jnp.asarray(rng.normal(size=(100, EMBED)), jnp.float32)},
    "encoder": {
      "layers_0": {
        "attention": attention(),
        "mlp": mlp(),
        "pre_attention_layer_norm": norm(),
        "pre_mlp_layer_norm": norm(),
      },
      "encoder_norm": norm(),
    },
    "decoder": {
      "layers_0": {
        "self_attention": attention(),
        "encoder_decoder_attention": attention(),
        "mlp": mlp(),
        "pre_self_attention_layer_norm": norm(),
      },
      "decoder_norm": norm(),
      "logits_dense": dense((EMBED, 100)),
    },
  }


T5_FF = [
  f"{stack}/layers_0/mlp/{name}/kernel"
  for stack in ("encoder", "decoder")
  for name in ("wi_0", "wi_1", "wo")
]
T5_QKV = [
  f"{prefix}/{name}/kernel"
  for prefix in (
    "encoder/layers_0/attention",
    "decoder/layers_0/self_attention",
    "decoder/layers_0/encoder_decoder_attention",
  )
  for name in ("query", "key", "value")
]

# A recipe whose forward pass is W * Phi during the sparsification phase (from step 0).
STE = recipes.ste(total_steps=100)


def _flat(tree):
  return {policy.path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_applied(params, out, expected, nm_reference):
  """Selected leaves are W * Phi along their axes; all others are the same objects."""
  flat_in, flat_out = _flat(params), _flat(out)
  assert flat_in.keys() == flat_out.keys()
  for path, w in flat_in.items():
    if path in expected:
      (n, m), axis = expected[path]
      phi = nm_reference(w, n, m, axis)
      np.testing.assert_array_equal(flat_out[path], np.where(phi, np.asarray(w), 0), err_msg=path)
    else:
      assert flat_out[path] is w, path


def test_t5_1_1_preset(nm_reference):
  params = _t5x_params()
  pol = policy.t5_1_1(STE, ff="1:8", qkv="1:4")
  plan = pol.resolve(params)
  expected = {p: ((1, 8), 0) for p in T5_FF} | {p: ((1, 4), 0) for p in T5_QKV}
  assert sorted(t.path for t in plan) == sorted(expected)
  for path, ((n, m), _) in expected.items():
    target = plan[path]
    assert (target.nm, target.axes, target.patterns) == (NM(n, m), (0,), (NM(n, m),))
    assert target.recipe.name == "ste" and target.axis_size == target.shape[0]
  assert len(plan) == 15 and "encoder/layers_0/attention/out/kernel" not in plan
  _check_applied(params, pol.apply(params, 10), expected, nm_reference)
  _check_applied(params, pol.apply(params, 10, plan=plan), expected, nm_reference)
  assert "mlp/wi_0/kernel" in plan.describe()
  groups = {path.rsplit("/", 2)[-2]: plan[path].group for path in expected}
  assert groups == {"wi_0": "ff", "wi_1": "ff", "wo": "ff", "query": "q", "key": "k", "value": "v"}


def test_rules_without_a_group_are_named_after_their_index():
  plan = Policy([Rule("mlp/wo/kernel$", "1:8"), Rule("query/kernel$", "1:4", group="attn")], STE)
  plan = plan.resolve(_t5x_params())
  assert {t.group for t in plan if "wo" in t.path} == {"rule_0"}
  assert {t.group for t in plan if "query" in t.path} == {"attn"}
  assert "rule_0" in plan.describe()


def test_apply_jitted_with_a_traced_step(nm_reference):
  params = _t5x_params(seed=1)
  recipe = recipes.sdgf_stepwise(total_steps=100, dense_steps=10, fine_tune_steps=20)
  pol = policy.t5_1_1(recipe, ff="1:8", attention="2:4")
  traces = 0

  @jax.jit
  def f(params, step):
    nonlocal traces
    traces += 1
    return pol.apply(params, step)

  dense = f(params, 0)
  for leaf_in, leaf_out in zip(jax.tree.leaves(params), jax.tree.leaves(dense), strict=True):
    np.testing.assert_array_equal(leaf_in, leaf_out)
  final = f(params, 90)
  expected = {p: ((1, 8), 0) for p in T5_FF} | {p: ((2, 4), 0) for p in T5_QKV}
  expected |= {p.replace("value", "out"): ((2, 4), 0) for p in T5_QKV if "value" in p}
  flat_in, flat_out = _flat(params), _flat(final)
  for path, w in flat_in.items():
    if path in expected:
      (n, m), axis = expected[path]
      np.testing.assert_array_equal(
        flat_out[path], np.where(nm_reference(w, n, m, axis), np.asarray(w), 0), err_msg=path
      )
    else:  # bitwise equal through jit
      np.testing.assert_array_equal(flat_out[path], w, err_msg=path)
  assert traces == 1


def _vit_params():
  config = ViTConfig(hidden=EMBED, depth=2, heads=HEADS, mlp_dim=MLP)
  model = VisionTransformer(config)
  return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


def test_vit_preset(nm_reference):
  params = _vit_params()
  pol = policy.vit(STE, ff="1:4", qkv="2:8", o="1:8")
  plan = pol.resolve(params)
  expected = {}
  for block in ("encoderblock_0", "encoderblock_1"):
    prefix = f"Transformer/{block}"
    for dense in ("Dense_0", "Dense_1"):
      expected[f"{prefix}/MlpBlock_0/{dense}/kernel"] = ((1, 4), 0)
    for name in ("query", "key", "value"):
      expected[f"{prefix}/MultiHeadDotProductAttention_0/{name}/kernel"] = ((2, 8), 0)
    expected[f"{prefix}/MultiHeadDotProductAttention_0/out/kernel"] = ((1, 8), (0, 1))
  assert sorted(t.path for t in plan) == sorted(expected)
  out_kernel = plan["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel"]
  assert out_kernel.shape == (HEADS, HEAD_DIM, EMBED) and out_kernel.axes == (0, 1)
  assert out_kernel.axis_size == HEADS * HEAD_DIM
  query = plan["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"]
  assert query.shape == (EMBED, HEADS, HEAD_DIM) and query.axes == (0,)
  _check_applied(params, pol.apply(params, 3), expected, nm_reference)


def test_rules_that_agree_and_per_rule_recipes(nm_reference):
  params = _t5x_params(seed=2)
  sdgf = recipes.sdgf_geometric("1:8", total_steps=100, k=2)
  pol = Policy(
    (
      Rule("mlp/wo/kernel$", "1:8"),
      ("decoder/layers_0/mlp/wo", "1:8", None, 0),  # agrees with rule 0: axis 0 is inferred
      Rule("attention/query/kernel$", recipe=sdgf),
      Rule("logits_dense/kernel", "1:4", axis=-2),
    ),
    STE,
  )
  plan = pol.resolve(params)
  assert plan["decoder/layers_0/mlp/wo/kernel"].rule == 0
  query = plan["encoder/layers_0/attention/query/kernel"]
  assert query.recipe is sdgf and query.patterns == (NM(2, 16), NM(1, 8))
  assert plan["decoder/logits_dense/kernel"].axes == (0,)
  expected = {
    "encoder/layers_0/mlp/wo/kernel": ((1, 8), 0),
    "decoder/layers_0/mlp/wo/kernel": ((1, 8), 0),
    "decoder/logits_dense/kernel": ((1, 4), 0),
  }
  out = _flat(pol.apply(params, 99))
  for path, ((n, m), axis) in expected.items():
    w = _flat(params)[path]
    np.testing.assert_array_equal(out[path], np.where(nm_reference(w, n, m, axis), w, 0))
  w = _flat(params)["encoder/layers_0/attention/query/kernel"]  # SDGF step 99: its target 1:8
  np.testing.assert_array_equal(
    out["encoder/layers_0/attention/query/kernel"], np.where(nm_reference(w, 1, 8), w, 0)
  )


def test_resolve_accepts_shape_structs():
  shapes = jax.eval_shape(_t5x_params)
  plan = policy.t5_1_1(STE, ff="1:8").resolve(shapes)
  assert len(plan) == 6 and plan[T5_FF[0]].shape == (EMBED, MLP)


def test_dense_groups_and_none():
  pol = policy.t5_1_1(recipes.dense(), ff="1:8", qkv=None)
  assert [r.pattern for r in pol.rules] == [r"mlp/wi(_\d+)?/kernel$", r"mlp/wo/kernel$"]
  params = _t5x_params()
  out = pol.apply(params, 5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out), strict=True):
    assert a is b


# ---- Errors. -----------------------------------------------------------------------------------


def test_rule_matching_nothing_lists_existing_paths():
  pol = Policy([Rule("mlp/wi/kernel$", "1:8")], STE)
  with pytest.raises(
    ValueError,
    match=r"rule 0 \('mlp/wi/kernel\$', 1:8\) matches no parameter; parameters: "
    r"decoder/decoder_norm/scale, .*, decoder/layers_0/mlp/wi_0/kernel, .*\(25 in all\)",
  ):
    pol.resolve(_t5x_params())
  with pytest.raises(ValueError, match=r"rule 0 .* matches no parameter.*\(\d+ in all\)"):
    pol.apply(_t5x_params(), 0)


def test_preset_on_the_wrong_naming():
  with pytest.raises(ValueError, match=r"MlpBlock_\\\\d\+/Dense_\[01\]/kernel\$.* matches no"):
    policy.vit(STE, ff="1:4").resolve(_t5x_params())


def test_two_rules_disagree():
  params = _t5x_params()
  for rules in (
    [Rule("mlp/wo/kernel", "1:8"), Rule("wo/kernel", "1:4")],
    [Rule("mlp/wo/kernel", "1:8"), Rule("wo/kernel", "1:8", recipes.sr_ste())],
    [Rule("mlp/wo/kernel", "1:8"), Rule("wo/kernel", "1:8", axis=1)],
  ):
    with pytest.raises(
      ValueError,
      match=r"decoder/layers_0/mlp/wo/kernel: claimed by rule 0 \('mlp/wo/kernel', .*\) and "
      r"rule 1 \('wo/kernel', .*\), which disagree",
    ):
      Policy(rules, STE).resolve(params)


def test_non_float_parameter_selected():
  params = {"layer": {"kernel": jnp.ones((8, 4)), "counts": jnp.zeros((8, 4), jnp.int32)}}
  with pytest.raises(ValueError, match=r"layer/counts: selected by rule 0 .* has dtype int32"):
    Policy([Rule("layer/", "1:4")], STE).resolve(params)


def test_rank_3_kernel_needs_an_axis():
  params = _vit_params()
  with pytest.raises(
    ValueError,
    match=r"Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel with shape "
    r"\(32, 4, 8\): cannot infer the contraction axis of a rank-3 kernel; give axis= in rule 0",
  ):
    Policy([Rule("query/kernel", "1:4")], STE).resolve(params)


def test_axis_not_divisible_by_m():
  params = {"mlp": {"wi": {"kernel": jnp.ones((770, 4))}}, "out": {"kernel": jnp.ones((3, 4, 6))}}
  with pytest.raises(
    ValueError,
    match=r"mlp/wi/kernel with shape \(770, 4\): axis 0 has size 770, not divisible by m=16",
  ):
    Policy([Rule("wi/kernel", "1:16")], STE).resolve(params)
  with pytest.raises(
    ValueError,
    match=r"out/kernel with shape \(3, 4, 6\): axis \(0, 1\) has size 12, not divisible by m=8",
  ):
    Policy([Rule("out/kernel", "1:8", axis=(0, 1))], STE).resolve(params)
  with pytest.raises(ValueError, match=r"out/kernel with shape \(3, 4, 6\): axis 3 is out of"):
    Policy([Rule("out/kernel", "1:2", axis=3)], STE).resolve(params)


def test_sdgf_pattern_that_cannot_fit():
  params = {"kernel": jnp.ones((64, 4))}
  recipe = recipes.sdgf_geometric(total_steps=100, fit_k="error")
  with pytest.raises(
    ValueError, match=r"kernel with shape \(64, 4\) \(axis 0\): SDGF-Geometric pattern 16:128"
  ):
    Policy([Rule("kernel", "1:8")], recipe).resolve(params)
  reduce = Policy([Rule("kernel", "1:8")], recipes.sdgf_geometric(total_steps=100))
  with pytest.warns(UserWarning, match=r"kernel with shape \(64, 4\) .*starting at k=8"):
    assert reduce.resolve(params)["kernel"].patterns[0] == NM(8, 64)


@pytest.mark.parametrize(
  ("groups", "match"),
  [
    (
      {"mlp": "1:8"},
      r"unknown layer group 'mlp' of 't5_1_1'; groups: ff, q, k, v, o, qk, qkv, attention",
    ),
    ({"qkv": "1:4", "q": "1:8"}, r"layer group 'q' is given twice \(through 'q'\)"),
    ({"attention": "1:4", "qk": "1:4"}, r"layer group 'q' is given twice \(through 'qk'\)"),
    ({"o": "1:4", "attention": "2:4"}, r"layer group 'o' is given twice \(through 'attention'\)"),
    ({"ff": None}, r"no layer group has an N:M pattern; nothing would be sparse"),
    ({}, r"nothing would be sparse"),
    ({"ff": "1-8"}, r"rule 0 \(.*\) nm='1-8' is not an N:M pattern"),
  ],
)
def test_preset_bad_groups(groups, match):
  with pytest.raises(ValueError, match=match):
    policy.t5_1_1(STE, **groups)


def test_policy_bad_construction():
  with pytest.raises(ValueError, match=r"a Policy needs at least one Rule"):
    Policy((), STE)
  with pytest.raises(ValueError, match=r"unknown naming 'bert'; known: t5_1_1, vit"):
    policy.from_groups("bert", STE, {"ff": "1:8"})
  with pytest.raises(
    ValueError, match=r"rule 0 \('kernel'\) has no recipe and the policy has none"
  ):
    Policy([Rule("kernel", "1:8")])
  with pytest.raises(ValueError, match=r"rule 0 \('kernel'\) sets no N:M and its recipe has none"):
    Policy([Rule("kernel")], STE)
  with pytest.raises(ValueError, match=r"rule 0: pattern 'wi\[' is not a regular expression"):
    Policy([Rule("wi[", "1:8")], STE)
  with pytest.raises(ValueError, match=r"rule 1 \('wo'\) nm=4:4 breaks 1 <= n < m"):
    Policy([Rule("wi", "1:8"), Rule("wo", "4:4")], STE)

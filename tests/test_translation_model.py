"""The encoder-decoder: naming the T5 1.1 policy selects, masking, token accuracy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nm_sparse_jax import policy as nmp
from nm_sparse_jax import recipes
from nm_sparse_jax.linen import Sparsified
from nm_sparse_jax.models import translation as tr

CONFIG = tr.TranslationConfig(vocab_size=32, hidden=16, layers=2, heads=2, mlp_dim=32, max_len=8)


@pytest.fixture(autouse=True)
def _flax_promotion():
  # Flax's attention-mask helpers and LayerNorm mix dtypes; run the model under the default rules.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


def _tokens(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CONFIG.vocab_size, (batch, CONFIG.max_len))
  tokens[0, 5:] = 0
  tokens[0, 4] = 1
  return jnp.asarray(tokens, jnp.int32)


@functools.cache
def _init():
  model = tr.EncoderDecoder(CONFIG)
  src, tgt = _tokens(0), _tokens(1)
  return model, model.init(jax.random.key(0), src, tr.shift_right(tgt))["params"], src, tgt


def test_policy_groups_select_the_kernels():
  model, params, *_ = _init()
  plan = nmp.t5_1_1(recipes.sr_ste(), ff="1:16", qkv="1:8").resolve(params)
  paths = sorted(t.path for t in plan)
  # 2 encoder layers x (2 FF + 3 QKV) + 2 decoder layers x (2 FF + 6 QKV).
  assert len(paths) == 26
  assert "encoder/layers_0/mlp/wi/kernel" in paths
  assert "decoder/layers_1/encoder_decoder_attention/value/kernel" in paths
  assert not any("logits_dense" in p or "/out/" in p for p in paths)
  assert all(t.axes == (0,) and str(t.nm) in ("1:16", "1:8") for t in plan)


def test_decoder_is_causal_and_ignores_source_padding():
  model, params, src, tgt = _init()
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, src, tr.shift_right(tgt))
  assert logits.shape == (3, CONFIG.max_len, CONFIG.vocab_size)
  changed = tgt.at[:, 5:].set(7)  # later targets change decoder inputs from position 6 on
  other = apply({"params": params}, src, tr.shift_right(changed))
  np.testing.assert_allclose(other[:, :6], logits[:, :6], rtol=1e-5, atol=1e-5)
  assert not np.allclose(other[:, 6:], logits[:, 6:])
  padded = src.at[0, 6:].set(0)  # row 0 is already padding from position 5
  np.testing.assert_allclose(
    apply({"params": params}, padded, tr.shift_right(tgt))[0], logits[0], rtol=1e-5, atol=1e-5
  )


def test_token_accuracy_and_loss_match_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 6, 10)).astype(np.float32)
  targets = rng.integers(1, 10, (4, 6)).astype(np.int32)
  targets[:, 4:] = 0
  targets[0, 0] = int(np.argmax(logits[0, 0]))
  correct, count = tr.token_accuracy(jnp.asarray(logits), jnp.asarray(targets))
  valid = targets > 0
  assert int(count) == valid.sum()
  assert int(correct) == ((logits.argmax(-1) == targets) & valid).sum()
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  expected = (nll * valid).sum() / valid.sum()
  np.testing.assert_allclose(
    tr.token_loss(jnp.asarray(logits), jnp.asarray(targets)), expected, rtol=1e-5
  )


def test_sparse_training_step_has_finite_gradients():
  model, params, src, tgt = _init()
  recipe = recipes.mdgf_exponential(total_steps=10, dense_steps=1)
  policy = nmp.t5_1_1(recipe, ff="1:16")
  wrapped = Sparsified(model, policy)

  @jax.jit
  def loss(p, step):
    variables = {"params": p, "nm_sparsity": {"step": step}}
    return tr.token_loss(wrapped.apply(variables, src, tr.shift_right(tgt)), tgt)

  value, grads = jax.value_and_grad(loss)(params, 5)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_attention_einsum_flops_formula():
  c = tr.TranslationConfig(hidden=64, layers=3, max_len=10)
  # encoder self, decoder self and cross attention: 2 einsums of 2 * L * L * hidden each.
  assert tr.attention_einsum_flops(c) == 3 * 3 * 2 * 2 * 10 * 10 * 64

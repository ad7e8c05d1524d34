"""The model hook on a real T5X model, and every GLUE/WMT configuration file of gin/.

Each test runs one Python subprocess (T5X is not imported into the pytest process).
"""

from __future__ import annotations

import pathlib

GIN = pathlib.Path(__file__).resolve().parents[2] / "gin"


def test_hook_gradients_metrics_and_decoding_match_the_formulas(t5x_harness):
  """On a 1+1-layer T5 1.1: ``d loss_fn / dW = dL/dW~ * (Phi + D (1 - Phi))`` for MDGF-Linear
  and ``dL/dW~ + lambda (1 - Phi) W`` for SR-STE (each kernel), other gradients unchanged;
  ``eval_fn`` is ``loss_fn`` without dropout; decoding and scoring use ``finalize(params)``."""
  result = t5x_harness.python(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import seqio
    from t5x import adafactor, models
    from t5x.examples.t5 import network
    import nm_sparse_jax as nm
    from nm_sparse_jax import recipes
    from nm_sparse_jax.policy import path_str
    from nm_sparse_jax.t5x import sparsify_model, t5_policy
    from nm_sparse_jax.t5x.tiny_tasks import vocabulary

    config = network.T5Config(vocab_size=128, dtype="float32", emb_dim=16, num_heads=2,
      num_encoder_layers=1, num_decoder_layers=1, head_dim=8, mlp_dim=32,
      mlp_activations=("gelu", "linear"), dropout_rate=0.0, logits_via_embedding=False)
    vocab = vocabulary()
    dense = models.EncoderDecoderModel(network.Transformer(config), vocab, vocab,
                                       adafactor.Adafactor())
    rng = np.random.default_rng(0)
    batch = {
      "encoder_input_tokens": rng.integers(3, 26, (2, 8)).astype(np.int32),
      "decoder_input_tokens": rng.integers(3, 26, (2, 6)).astype(np.int32),
      "decoder_target_tokens": rng.integers(3, 26, (2, 6)).astype(np.int32),
      "decoder_loss_weights": np.ones((2, 6), np.float32),
    }
    shapes = {k: v.shape for k, v in batch.items() if k.endswith("input_tokens")}
    params = dense.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
    out = {}
    mdgf = recipes.mdgf_linear(total_steps=10, dense_steps=2, fine_tune_steps=2, decay_end=6)
    for name, recipe, step in (("mdgf", mdgf, 4), ("sr_ste", recipes.sr_ste(lambda_w=0.5), 1)):
      policy = t5_policy(recipe, ff="1:4", attention="1:2", attention_layers="attention")
      model = sparsify_model(dense, policy)
      plan = policy.resolve(params)
      (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        params, batch, None, nm_step=step)
      w_tilde = policy.apply(params, step)
      (dense_loss, _), g_tilde = jax.value_and_grad(dense.loss_fn, has_aux=True)(
        w_tilde, batch, None)
      errors = []
      flat = lambda t: {path_str(p): np.asarray(x) for p, x in
                        jax.tree_util.tree_flatten_with_path(t)[0]}
      grads, g_tilde, ws = flat(grads), flat(g_tilde), flat(params)
      for path, g in grads.items():
        expected = g_tilde[path]
        if path in plan:
          t = plan[path]
          keep = np.asarray(nm.nm_mask(ws[path], t.nm.n, t.nm.m, axis=t.axes))
          if name == "mdgf":
            d = float(recipe.decay(step))
            expected = expected * (keep + d * (1 - keep))
          else:
            expected = expected + 0.5 * (1 - keep) * ws[path]
        errors.append(float(np.max(np.abs(g - expected))))
      eval_loss, _ = model.eval_fn(params, batch, nm_step=step)
      final = nm.finalize(params, policy)
      predict = np.asarray(model.predict_batch(params, batch))
      predict_dense = np.asarray(dense.predict_batch(final, batch))
      score = np.asarray(model.score_batch(params, batch))
      score_dense = np.asarray(dense.score_batch(final, batch))
      out[name] = {
        "loss_gap": abs(float(loss) - float(dense_loss)),
        "eval_gap": abs(float(eval_loss) - float(loss)),
        "max_grad_error": max(errors),
        "selected": len(plan),
        "predict_equal": bool(np.array_equal(predict, predict_dense)),
        "score_gap": float(np.max(np.abs(score - score_dense))),
        "metric_step": float(metrics["nm_sparsity/step"].compute()),
        "metric_decay": float(metrics["nm_sparsity/ff/decay"].compute()),
      }
    print(json.dumps(out))
    """,
    log="hook_unit",
  )
  for name, r in result.items():
    assert r["selected"] == 6 + 4 + 8, name  # mlp 2 x (wi_0, wi_1, wo); enc 4; dec 2 x 4
    assert r["loss_gap"] == 0.0 and r["eval_gap"] == 0.0, (name, r)
    assert r["max_grad_error"] <= 1e-6, (name, r)
    assert r["predict_equal"] and r["score_gap"] == 0.0, (name, r)
  assert result["mdgf"]["metric_step"] == 4.0 and result["mdgf"]["metric_decay"] == 0.5
  assert result["sr_ste"]["metric_decay"] == 0.0


def test_glue_and_wmt_configurations_build_and_fit_the_real_models(t5x_harness):
  """Every gin/glue and gin/wmt configuration parses with its run file, builds the sparse model
  and trainer, and its policy resolves against the real T5 1.1 base / WMT parameter shapes
  (contraction axes divisible by every pattern's M). The eval files parse alone and with a
  configuration file. The model's vocabulary equals the registered task's, as T5X checks before
  it starts (utils.verify_matching_vocabs)."""
  result = t5x_harness.python(
    f"""
    import glob, json, os, warnings
    import gin, jax, seqio
    import t5x
    from nm_sparse_jax.t5x import NMSparseModel, NMSparseTrainer

    def train(**kwargs):
      return kwargs
    train = gin.configurable(train)

    def evaluate(**kwargs):
      return kwargs
    evaluate = gin.configurable(evaluate)

    def vocabulary_matches(model, dataset_cfg):
      task = seqio.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
      return (task.output_features["inputs"].vocabulary == model.input_vocabulary
              and task.output_features["targets"].vocabulary == model.output_vocabulary)

    def parse(files, bindings):
      gin.clear_config()
      for path in (gin_dir, t5x_root):
        gin.add_config_file_search_path(path)
      gin.parse_config_files_and_bindings(files, bindings)

    gin_dir = {str(GIN)!r}
    t5x_root = os.path.dirname(os.path.dirname(t5x.__file__))
    shapes = {{}}
    out = {{}}
    for family, run in (("glue", "glue/finetune.gin"), ("wmt", "wmt/train.gin")):
      for config in sorted(glob.glob(f"{{gin_dir}}/{{family}}/*.gin")):
        name = os.path.relpath(config, gin_dir)
        if name in (run, "glue/eval.gin", "wmt/eval.gin", "wmt/architecture.gin"):
          continue
        parse([run, name], ["MODEL_DIR = '/tmp/unused'"])
        kwargs = train()
        model, trainer_cls = kwargs["model"], kwargs["trainer_cls"]
        assert isinstance(model, NMSparseModel) and issubclass(trainer_cls, NMSparseTrainer)
        if family not in shapes:
          inputs = {{"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}}
          shapes[family] = jax.eval_shape(
            lambda: model.get_initial_variables(jax.random.PRNGKey(0), inputs))["params"]
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter("always")
          plan = model.nm_policy.resolve(shapes[family])
        out[name] = {{
          "kernels": len(plan),
          "recipe": next(iter(plan)).recipe.name,
          "patterns": sorted({{" > ".join(map(str, t.patterns)) for t in plan}}),
          "total": kwargs["total_steps"],
          "optimizer": type(model.optimizer_def).__name__,
          "warnings": len(caught),
          "vocabulary": vocabulary_matches(model, kwargs["train_dataset_cfg"]),
        }}
      for config in (None, sorted(glob.glob(f"{{gin_dir}}/{{family}}/ff1-*.gin"))[0]):
        files = [f"{{family}}/eval.gin"] + ([os.path.relpath(config, gin_dir)] if config else [])
        parse(files, ["CHECKPOINT_PATH = '/tmp/unused'", "EVAL_OUTPUT_DIR = '/tmp/unused'"])
        kwargs = evaluate()
        out[" + ".join(files)] = {{
          "sparse": isinstance(kwargs["model"], NMSparseModel),
          "vocabulary": vocabulary_matches(kwargs["model"], kwargs["dataset_cfg"]),
        }}
    print(json.dumps(out))
    """,
    log="configs",
  )
  evals = {k: result.pop(k) for k in list(result) if k.split(" + ")[0].endswith("/eval.gin")}
  assert evals == {
    "glue/eval.gin": {"sparse": False, "vocabulary": True},
    "glue/eval.gin + glue/ff1-32_sdgf_geometric_10k_dense.gin": {
      "sparse": True,
      "vocabulary": True,
    },
    "wmt/eval.gin": {"sparse": False, "vocabulary": True},
    "wmt/eval.gin + wmt/ff1-128_mdgf_exponential.gin": {"sparse": True, "vocabulary": True},
  }
  glue = {k: v for k, v in result.items() if k.startswith("glue/")}
  wmt = {k: v for k, v in result.items() if k.startswith("wmt/")}
  assert len(glue) == 1 + 5 * 5 and len(wmt) == 1 + 4 * 3
  for name, r in result.items():
    assert r["optimizer"] == "OptaxWrapper", (name, r)
    assert r["vocabulary"], (name, r)
    assert r["total"] == (1_100_000 if name.startswith("glue/") else 200_000), (name, r)
  # T5 1.1 base: 12 + 12 layers; FF = wi_0, wi_1, wo; Q/K = 12 + 2 x 12 attentions.
  assert glue["glue/ff1-4_sr_ste_10k_dense.gin"]["kernels"] == 24 * 3
  assert glue["glue/ff1-8_qk1-8_sdgf_stepwise_10k_dense.gin"]["kernels"] == 72 + 36 * 2
  assert glue["glue/ff1-8_qkv1-4_sr_ste_zero_dense.gin"]["kernels"] == 72 + 36 * 3
  assert glue["glue/ff1-8_qkv1-8_sdgf_stepwise_10k_dense.gin"]["patterns"] == [
    "7:8 > 4:8 > 2:8 > 1:8"
  ]
  # SDGF-Geometric k=16 on 1:32: 16:512 does not divide 768 (wi, q, k), 8:256 does.
  geometric = glue["glue/ff1-32_sdgf_geometric_10k_dense.gin"]
  assert geometric["warnings"] > 0
  assert "8:256 > 4:128 > 2:64 > 1:32" in geometric["patterns"]
  assert glue["glue/dense.gin"]["recipe"] == "dense"
  # WMT: 6 + 6 layers, single ReLU FF (wi, wo): 24 kernels.
  assert wmt["wmt/ff1-128_mdgf_exponential.gin"]["kernels"] == 24
  assert wmt["wmt/ff1-16_sdgf_stepwise.gin"]["patterns"] == ["15:16 > 8:16 > 4:16 > 2:16 > 1:16"]

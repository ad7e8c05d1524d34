"""Harness of the T5X integration tests: real ``python -m t5x.train`` / ``t5x.eval`` subprocesses.

The tests need T5X, which is not on PyPI: they skip (with the reason) where ``t5x`` cannot be
found, e.g. in CI. Run them with the interpreter of a T5X environment, alone by marker::

  /work/t5x-venv/bin/python -m pytest tests/t5x -m t5x

Nothing here imports T5X, TensorFlow or seqio into the pytest process: every T5X step runs in a
subprocess of ``sys.executable`` (the project's ``filterwarnings = error`` would turn their
import-time deprecation warnings into failures). The training runs that several test modules
read (``dense_run``, ``sparse_run``, ``wmt_run``, ``sr_ste_glue_run``) are session fixtures here,
each trained once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
GIN = REPO / "gin"
_MISSING = [m for m in ("t5x", "seqio", "tensorflow", "gin") if importlib.util.find_spec(m) is None]
SKIP_REASON = (
  f"T5X integration tests need {', '.join(_MISSING)} (not importable with {sys.executable}); "
  "T5X is not on PyPI: see the README's T5X section, then run "
  "`<t5x-venv>/bin/python -m pytest tests/t5x`"
)


def pytest_configure(config):
  config.addinivalue_line("markers", "t5x: real T5X runs (python -m t5x.train), slow; need T5X")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if pathlib.Path(str(item.fspath)).is_relative_to(pathlib.Path(__file__).parent):
      item.add_marker(pytest.mark.t5x)
      if _MISSING:
        item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def _env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    TF_CPP_MIN_LOG_LEVEL="2",
    JAX_PLATFORMS="cpu",
    PYTHONWARNINGS="ignore",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )
  return env


def _launch(via, module: str) -> list:
  return [*via, module] if via else ["-m", module]


class Harness:
  """Runs T5X commands and our checkpoint command in subprocesses; keeps each log."""

  def __init__(self, root: pathlib.Path):
    self.root = root

  def run(self, args, *, log: str, devices: int = 1, expect_rc: int | None = 0, timeout=600):
    """Runs ``python <args>`` in ``root``; returns (rc, output) and asserts ``expect_rc``."""
    proc = subprocess.run(
      [sys.executable, *map(str, args)],
      cwd=self.root,
      env=_env(devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      timeout=timeout,
    )
    (self.root / f"{log}.log").write_text(proc.stdout)
    if expect_rc is not None and proc.returncode != expect_rc:
      tail = "\n".join(proc.stdout.splitlines()[-60:])
      pytest.fail(f"{log}: exit {proc.returncode}, expected {expect_rc}; log tail:\n{tail}")
    return proc.returncode, proc.stdout

  def train(self, model_dir, gin_files, bindings=(), *, flags=(), via=(), **kwargs):
    """``python -m t5x.train`` with ``gin/`` on the search path and ``MODEL_DIR=model_dir``.

    ``flags``: other flags of the module (``--tfds_data_dir=...``). ``via``: a script and its
    arguments that runs the module instead of ``python -m`` (``offline_t5.py run SPM``).
    """
    args = [*_launch(via, "t5x.train"), f"--gin_search_paths={GIN}", *flags]
    args += [f"--gin_file={g}" for g in gin_files]
    args += [f"--gin.MODEL_DIR='{model_dir}'", *[f"--gin.{b}" for b in bindings]]
    return self.run(args, log=kwargs.pop("log", pathlib.Path(model_dir).name), **kwargs)

  def evaluate(self, checkpoint, out_dir, gin_files, bindings=(), *, flags=(), via=(), **kwargs):
    """``python -m t5x.eval`` of ``checkpoint`` into ``out_dir`` (``flags``, ``via``: as
    for :meth:`train`)."""
    args = [*_launch(via, "t5x.eval"), f"--gin_search_paths={GIN}", *flags]
    args += [f"--gin_file={g}" for g in gin_files]
    args += [f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.EVAL_OUTPUT_DIR='{out_dir}'"]
    args += [f"--gin.{b}" for b in bindings]
    return self.run(args, log=kwargs.pop("log", pathlib.Path(out_dir).name), **kwargs)

  def checkpoint(self, *args, **kwargs):
    """``python -m nm_sparse_jax.t5x.checkpoint ...``."""
    return self.run(["-m", "nm_sparse_jax.t5x.checkpoint", *args], **kwargs)

  def python(self, code: str, *, log: str, devices: int = 1):
    """Runs a Python snippet; returns the JSON it prints on its last line."""
    _, out = self.run(["-c", textwrap.dedent(code)], log=log, devices=devices)
    return json.loads(out.strip().splitlines()[-1])

  def summaries(self, folder) -> dict[str, dict[int, float]]:
    """Scalars of the TensorBoard event files under ``folder``: ``{tag: {step: value}}``."""
    return self.summaries_of([folder])[0]

  def summaries_of(self, folders) -> list[dict[str, dict[int, float]]]:
    """:meth:`summaries` of each of ``folders``, read by one subprocess."""
    found = self.python(
      f"""
      import glob, json
      import tensorflow as tf
      found = []
      for folder in {[str(f) for f in folders]!r}:
        out = {{}}
        for path in sorted(glob.glob(folder + "/**/events.out.tfevents.*", recursive=True)):
          for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
              if v.HasField("tensor") and not v.tensor.string_val:
                out.setdefault(v.tag, {{}})[event.step] = float(tf.make_ndarray(v.tensor))
        found.append(out)
      print(json.dumps(found))
      """,
      log="summaries",
    )
    return [
      {tag: {int(k): v for k, v in steps.items()} for tag, steps in one.items()} for one in found
    ]

  def params(self, checkpoint, paths) -> dict[str, list]:
    """Selected parameters (by '/'-joined path) of a T5X checkpoint, as nested lists."""
    return self.python(
      f"""
      import json
      from nm_sparse_jax.policy import path_str
      from nm_sparse_jax.t5x.checkpoint import load_state
      import jax
      target = load_state({str(checkpoint)!r})["target"]
      leaves = {{path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}}
      print(json.dumps({{k: leaves[k].tolist() for k in {list(paths)!r}}}))
      """,
      log="params",
    )

  def compare_checkpoints(self, a, b) -> dict[str, dict]:
    """Every parameter of checkpoints ``a`` and ``b``: ``{path: {"diff", "scale", "same_mask"}}``.

    ``diff`` is the largest absolute difference, ``scale`` the largest magnitude in ``a``, and
    ``same_mask`` (selected kernels only, per the N:M macros of ``a``'s run's ``config.gin``)
    whether the target N:M masks ``Phi`` of the two kernels are equal.
    """
    return self.python(
      f"""
      import json, os
      import jax, numpy as np
      from nm_sparse_jax import nm_mask
      from nm_sparse_jax.policy import path_str
      from nm_sparse_jax.t5x.checkpoint import load_state, make_policy, policy_from_config

      def leaves(path):
        target = load_state(path)["target"]
        return {{path_str(p): np.asarray(x)
                 for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}}

      a, b = leaves({str(a)!r}), leaves({str(b)!r})
      with open(os.path.join(os.path.dirname({str(a)!r}), "config.gin")) as f:
        plan = make_policy(**policy_from_config(f.read())).resolve(a)
      out = {{k: {{"diff": float(np.max(np.abs(a[k] - b[k]))),
                  "scale": float(np.max(np.abs(a[k])))}} for k in a}}
      for t in plan:
        mask = lambda w: np.asarray(nm_mask(w, t.nm.n, t.nm.m, axis=t.axes))
        out[t.path]["same_mask"] = bool(np.array_equal(mask(a[t.path]), mask(b[t.path])))
      print(json.dumps(out))
      """,
      log="compare_checkpoints",
    )

  @staticmethod
  def predictions(eval_dir, task: str) -> list[str]:
    """The decoded predictions of ``task`` in the first inference file of a T5X eval folder."""
    path = sorted((pathlib.Path(eval_dir) / "inference_eval").glob(f"{task}-0*.jsonl"))[0]
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def t5x_harness(tmp_path_factory) -> Harness:
  return Harness(tmp_path_factory.mktemp("t5x"))


# The tiny MDGF-Linear run (gin/tiny/sparse.gin) with its trainer, from scratch.
SPARSE = ("tiny/pretrain.gin", "tiny/sparse.gin", "nm/trainer.gin")
# Shrinks a GLUE/WMT run to the tiny model and task: gin/tiny/arch.gin plus these bindings.
TINY_RUN = (
  "MIXTURE_OR_TASK_MODULE=None",
  "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
  "BATCH_SIZE=8",
  "USE_CACHED_TASKS=False",
  "train/utils.DatasetConfig.seed=0",
  "utils.SaveCheckpointConfig.period=4",
)


# A GLUE fine-tuning run shrunk for the tests: 8 sparse steps (dense j < 1, fine-tune j >= 6)
# after the dense run's checkpoint_10, inference eval every 4 steps.
GLUE_FROM_STEP_10 = (
  "TRAIN_STEPS=18",
  "NM_TOTAL_STEPS=8",
  "NM_DENSE_STEPS=1",
  "NM_FINE_TUNE_STEPS=2",
  "EVAL_PERIOD=4",
  "EVAL_STEPS=2",
)


@pytest.fixture(scope="session")
def glue_from_step_10(dense_run) -> tuple[str, ...]:
  """:data:`GLUE_FROM_STEP_10` and the dense run's checkpoint_10 as the initial checkpoint."""
  return (f"INITIAL_CHECKPOINT_PATH='{dense_run / 'checkpoint_10'}'", *GLUE_FROM_STEP_10)


@pytest.fixture(scope="session")
def sparse_gin() -> tuple[str, ...]:
  return SPARSE


@pytest.fixture(scope="session")
def tiny_run() -> tuple[str, ...]:
  return TINY_RUN


@pytest.fixture(scope="session")
def sparse_run(t5x_harness):
  """10 steps from scratch with the default Adafactor, through the whole schedule."""
  model_dir = t5x_harness.root / "sparse"
  t5x_harness.train(model_dir, SPARSE)
  return model_dir


@pytest.fixture(scope="session")
def dense_run(t5x_harness):
  """A dense tiny pretraining run (stock T5X): the checkpoints that fine-tuning starts from."""
  model_dir = t5x_harness.root / "dense"
  t5x_harness.train(model_dir, ["tiny/pretrain.gin"])
  return model_dir


@pytest.fixture(scope="session")
def wmt_run(t5x_harness):
  """wmt/train.gin + wmt/ff1-16_mdgf_exponential.gin shrunk: Adam + nm_sparsity, 8 steps from
  scratch (dense j < 1, fine-tune j >= 6), checkpoints 0, 4, 8, BLEU-style inference eval."""
  model_dir = t5x_harness.root / "wmt_tiny"
  t5x_harness.train(
    model_dir,
    ["wmt/train.gin", "wmt/ff1-16_mdgf_exponential.gin", "tiny/arch.gin"],
    [
      *TINY_RUN,
      "MIXTURE_OR_TASK_NAME='nm_tiny_copy'",
      "TRAIN_STEPS=8",
      "NM_TOTAL_STEPS=8",
      "NM_DENSE_STEPS=1",
      "NM_FINE_TUNE_STEPS=2",
      "train.eval_period=4",
      "train.eval_steps=2",
    ],
  )
  return model_dir


@pytest.fixture(scope="session")
def sr_ste_glue_run(t5x_harness, dense_run):
  """glue/finetune.gin + glue/ff1-4_sr_ste_10k_dense.gin shrunk: AdamW + nm_sparsity, SR-STE 1:4
  on the FF kernels, 8 steps with the "10K dense" phase shrunk to j < 2, summaries every 2 steps,
  checkpoints 0, 4, 8. It starts from the dense run's checkpoint_0 (fresh weights, Table 15's
  learning-rate warmup keeps them near it): its decodes differ from example to example, which
  gives the eval comparisons of tests/t5x something to compare."""
  model_dir = t5x_harness.root / "glue_sr_ste"
  t5x_harness.train(
    model_dir,
    ["glue/finetune.gin", "glue/ff1-4_sr_ste_10k_dense.gin", "tiny/arch.gin"],
    [
      *TINY_RUN,
      "MIXTURE_OR_TASK_NAME='nm_tiny_classify'",
      f"INITIAL_CHECKPOINT_PATH='{dense_run / 'checkpoint_0'}'",
      "TRAIN_STEPS=8",
      "NM_TOTAL_STEPS=8",
      "NM_DENSE_STEPS=2",
      "EVAL_PERIOD=2",
      "EVAL_STEPS=2",
    ],
  )
  return model_dir

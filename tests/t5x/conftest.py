"""Harness of the T5X integration tests: real ``python -m t5x.train`` / ``t5x.eval`` subprocesses.

The tests need T5X, which is not on PyPI: they skip (with the reason) where ``t5x`` cannot be
found, e.g. in CI. Run them with the interpreter of a T5X environment, alone by marker::

  /work/t5x-venv/bin/python -m pytest tests/t5x -m t5x

Nothing here imports T5X, TensorFlow or seqio into the pytest process: every T5X step runs in a
subprocess of ``sys.executable`` (the project's ``filterwarnings = error`` would turn their
import-time deprecation warnings into failures).
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

  def train(self, model_dir, gin_files, bindings=(), **kwargs):
    """``python -m t5x.train`` with ``gin/`` on the search path and ``MODEL_DIR=model_dir``."""
    args = ["-m", "t5x.train", f"--gin_search_paths={GIN}"]
    args += [f"--gin_file={g}" for g in gin_files]
    args += [f"--gin.MODEL_DIR='{model_dir}'", *[f"--gin.{b}" for b in bindings]]
    return self.run(args, log=kwargs.pop("log", pathlib.Path(model_dir).name), **kwargs)

  def evaluate(self, checkpoint, out_dir, gin_files, bindings=(), **kwargs):
    """``python -m t5x.eval`` of ``checkpoint`` into ``out_dir``."""
    args = ["-m", "t5x.eval", f"--gin_search_paths={GIN}"]
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
    found = self.python(
      f"""
      import glob, json
      import tensorflow as tf
      out = {{}}
      for path in sorted(glob.glob({str(folder)!r} + "/**/events.out.tfevents.*", recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
          for v in event.summary.value:
            if v.HasField("tensor") and not v.tensor.string_val:
              out.setdefault(v.tag, {{}})[event.step] = float(tf.make_ndarray(v.tensor))
      print(json.dumps(out))
      """,
      log="summaries",
    )
    return {tag: {int(k): v for k, v in steps.items()} for tag, steps in found.items()}

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


@pytest.fixture(scope="session")
def t5x_harness(tmp_path_factory) -> Harness:
  return Harness(tmp_path_factory.mktemp("t5x"))

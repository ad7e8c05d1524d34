"""Verify the N:M structure of a T5X checkpoint, and export a finalized hard-N:M checkpoint.

Commands (``python -m nm_sparse_jax.t5x.checkpoint ...``)::

  verify MODEL_DIR/checkpoint_STEP [--ff 1:8] [--attention 1:4 --attention_layers qkv]
  export MODEL_DIR/checkpoint_STEP OUT_DIR [same pattern flags]

``verify`` prints, for every selected kernel, the N:M it satisfies along its contraction axis
(axis 0 of T5X's 2-D kernels) and its sparsity, then the sparsity of all parameters; it exits
with status 1 when a group of ``m`` holds more than ``n`` nonzeros. A checkpoint saved during
training holds the dense ``W`` (the model computes with ``W~``), unless the optax chain ended with
``nm_sparse_jax.nm_sparsity`` (which projects the parameters in the fine-tune phase): ``export``
first.

``export`` writes ``OUT_DIR/checkpoint_STEP``: the same checkpoint (optimizer state, step,
dataset state) with every selected kernel replaced by ``W * Phi`` (:func:`nm_sparse_jax.finalize`).
Plain T5X restores it with the model's ordinary gin (no ``nm_sparse_jax`` gin), to evaluate,
serve or fine-tune further.

The N:M patterns come from the flags or, without any, from the ``NM_FF``, ``NM_ATTENTION`` and
``NM_ATTENTION_LAYERS`` macros of the run's ``config.gin`` (the checkpoint's parent folder, or
``--config``), as written by ``python -m t5x.train`` with the gin files of ``gin/``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nm_sparse_jax import finalize, recipes, verify
from nm_sparse_jax.policy import Policy, t5_1_1

__all__ = ["export", "load_state", "main", "make_policy", "policy_from_config", "verify_checkpoint"]

_MACROS = ("NM_FF", "NM_ATTENTION", "NM_ATTENTION_LAYERS")


def policy_from_config(text: str) -> dict[str, str | None]:
  """The pattern macros of a T5X ``config.gin``: ``{"ff": ..., "attention": ..., "layers": ...}``.

  >>> policy_from_config("NM_FF = '1:8'\\nNM_ATTENTION = None\\n")
  {'ff': '1:8', 'attention': None, 'layers': 'qkv'}
  """
  found = {}
  for name in _MACROS:
    match = re.search(rf"^{name} = (.+)$", text, re.M)
    found[name] = ast.literal_eval(match.group(1)) if match else None
  return {
    "ff": found["NM_FF"],
    "attention": found["NM_ATTENTION"],
    "layers": found["NM_ATTENTION_LAYERS"] or "qkv",
  }


def make_policy(ff: str | None, attention: str | None, layers: str = "qkv") -> Policy:
  """The T5 1.1 policy of the given targets (the recipe does not matter for verify/export)."""
  return t5_1_1(recipes.ste(), ff=ff, **{layers: attention})


def _path(path: str) -> epath.Path:
  """An absolute path (Orbax needs one); URLs such as ``gs://...`` are kept."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def load_state(path: str) -> dict:
  """The state tree of the T5X (Orbax) checkpoint folder ``path`` as NumPy arrays.

  Returns:
    ``{"target": params, "state": {"step": ..., "param_states": ...}, ...}``.
  """
  state_dir = _path(path) / "state"
  metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return ocp.PyTreeCheckpointer().restore(state_dir, restore_args=restore_args)


def verify_checkpoint(path: str, policy: Policy):
  """The :class:`~nm_sparse_jax.VerifyReport` of the parameters of checkpoint ``path``."""
  return verify(load_state(path)["target"], policy, strict=False)


def _copy_tree(source: epath.Path, dest: epath.Path) -> None:
  if source.is_dir():
    dest.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
      _copy_tree(child, dest / child.name)
  else:
    source.copy(dest)


def export(path: str, out_dir: str, policy: Policy) -> str:
  """Writes ``out_dir/<name of path>``: checkpoint ``path`` with its kernels finalized.

  The ``state`` item is rewritten (Orbax); the other items (``dataset``) and the step metadata
  are copied as they are.

  Returns:
    The new checkpoint folder.

  Raises:
    FileExistsError: the new checkpoint folder exists.
  """
  source = _path(path)
  state = load_state(path)
  state["target"] = jax.tree.map(np.asarray, finalize(state["target"], policy))
  out = _path(out_dir) / source.name
  if out.exists():
    raise FileExistsError(f"{out} exists")
  tmp = _path(out_dir) / f"{source.name}.tmp"
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  ocp.PyTreeCheckpointer().save(tmp / "state", state)
  for child in source.iterdir():
    if child.name != "state":
      _copy_tree(child, tmp / child.name)
  tmp.rename(out)
  return str(out)


def _policy(args) -> Policy:
  if args.ff is None and args.attention is None:
    config = args.config or os.path.join(
      os.path.dirname(os.path.normpath(args.checkpoint)), "config.gin"
    )
    if not os.path.exists(config):
      raise SystemExit(f"no --ff/--attention given and no {config} to read NM_* macros from")
    with open(config) as f:
      found = policy_from_config(f.read())
    ff, attention, layers = found["ff"], found["attention"], found["layers"]
  else:
    ff, attention, layers = args.ff, args.attention, args.attention_layers
  return make_policy(ff, attention, layers)


def _report_json(report) -> dict:
  return {
    "ok": report.ok,
    "sparsity": report.sparsity,
    "layers": [
      {
        "path": r.path,
        "target": str(r.target),
        "satisfied": str(r.satisfied),
        "sparsity": r.sparsity,
        "bad_groups": r.bad_groups,
      }
      for r in report.layers
    ],
  }


def main(argv=None) -> int:
  """The command line; returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="python -m nm_sparse_jax.t5x.checkpoint", description=__doc__.split("\n")[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("verify", "export"):
    p = sub.add_parser(name)
    p.add_argument("checkpoint", help="a T5X checkpoint folder, MODEL_DIR/checkpoint_STEP")
    if name == "export":
      p.add_argument("out_dir", help="folder to write checkpoint_STEP into")
    p.add_argument("--ff", help="N:M of the MLP kernels, e.g. 1:8")
    p.add_argument("--attention", help="N:M of the attention kernels of --attention_layers")
    p.add_argument(
      "--attention_layers", default="qkv", choices=("q", "k", "v", "o", "qk", "qkv", "attention")
    )
    p.add_argument("--config", help="config.gin to read NM_* macros from (default: the run's)")
    p.add_argument("--json", help="also write the verification report to this JSON file")
  args = parser.parse_args(argv)
  policy = _policy(args)
  path = args.checkpoint
  if args.command == "export":
    path = export(args.checkpoint, args.out_dir, policy)
    print(f"wrote {path}")
  report = verify_checkpoint(path, policy)
  print(report)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(_report_json(report), f, indent=2)
  if not report.ok:
    bad = [r.path for r in report.layers if not r.ok]
    print(f"NOT N:M: {len(bad)} kernels break their target (export writes a finalized copy)")
    return 1
  print("OK: every selected kernel is N:M along its contraction axis")
  return 0


if __name__ == "__main__":
  sys.exit(main())

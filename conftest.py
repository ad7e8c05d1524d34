"""Repository-level pytest configuration: doctests of modules whose optional stack is absent
are not collected (the T5X glue needs t5x, which is installed from source, not from PyPI)."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("t5x") is None:
  collect_ignore_glob.append("nm_sparse_jax/t5x/*")

"""Comparing sparse-training recipes on one model and data set (the paper's Tables 2 and 5).

:func:`compare` trains the same model with several recipes x N:M targets x seeds, logging the
gradient-flow diagnostics (:mod:`nm_sparse_jax.diagnostics`) and counting training FLOPs
(:mod:`nm_sparse_jax.training_flops`), and writes ``results.json`` (every run), ``results.md``
(accuracy mean ± std per recipe and target, paired differences to SR-STE, FLOPs per phase),
PNG plots of the diagnostics (Fig. 3), accuracy against training FLOPs (Fig. 4b) and against
inference FLOPs (Fig. 5), and ``figures.json`` (the data of every plot). The command line is
``python -m nm_sparse_jax compare``.

>>> parse_target("ff=1:8,qkv=1:8"), target_label({"ff": "1:32"})
({'ff': '1:8', 'qkv': '1:8'}, '1:32 (FF)')
"""

from ._report import accuracy_table, figures, flops_table, paired_table, write_reports
from ._runner import Settings, compare, parse_target, run_key, target_label, train_one
from ._tasks import TASKS, Task, digits_task, fashion_mnist_task, make_task, translation_task

__all__ = [
  "TASKS",
  "Settings",
  "Task",
  "accuracy_table",
  "compare",
  "digits_task",
  "fashion_mnist_task",
  "figures",
  "flops_table",
  "make_task",
  "paired_table",
  "parse_target",
  "run_key",
  "target_label",
  "train_one",
  "translation_task",
  "write_reports",
]

"""Tiny offline SeqIO tasks and vocabulary, for smoke tests and the tests of ``tests/t5x``.

Nothing is downloaded: the examples are generated in memory (a fixed seed), and the vocabulary is
the 26-piece SentencePiece model that ships inside the ``seqio`` wheel. Importing this module
registers two tasks, each with ``train`` and ``validation`` splits:

* ``nm_tiny_copy``: ``"copy: <words>"`` -> ``"<words>"``;
* ``nm_tiny_classify``: ``"classify: <words>"`` -> ``"yes"`` when the first word is "a", else
  ``"no"`` (metric: exact match).

Use :func:`vocabulary` for the model as well (gin: ``VOCABULARY = @tiny_tasks.vocabulary()``):
T5X checks that the model's and the task's vocabularies are equal, and two vocabularies read from
different paths are not.
"""

from __future__ import annotations

import functools
import os
import random

import seqio
import tensorflow as tf

__all__ = ["TASKS", "examples", "vocabulary"]

TASKS = ("nm_tiny_copy", "nm_tiny_classify")
_WORDS = ("a", "b", "c", "d", "e", "hello", "world", "cat", "dog", "sun")
_SIZES = {"train": 256, "validation": 16}


@functools.cache
def vocabulary() -> seqio.SentencePieceVocabulary:
  """The SentencePiece model shipped in the seqio wheel (26 pieces, eos=1, unk=2)."""
  path = os.path.join(
    os.path.dirname(seqio.__file__), "test_data", "sentencepiece", "sentencepiece.model"
  )
  return seqio.SentencePieceVocabulary(path)


def examples(task: str, split: str, *, seed: int = 0) -> list[dict[str, str]]:
  """The generated ``{"inputs", "targets"}`` examples of ``task`` and ``split``.

  >>> examples("nm_tiny_classify", "validation")[0]["inputs"].startswith("classify: ")
  True
  """
  rng = random.Random(f"{task}/{split}/{seed}")
  out = []
  for _ in range(_SIZES[split]):
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
    if task == "nm_tiny_copy":
      out.append({"inputs": f"copy: {words}", "targets": words})
    else:
      label = "yes" if words.split()[0] == "a" else "no"
      out.append({"inputs": f"classify: {words}", "targets": label})
  return out


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, task: str):
  del shuffle_files, seed
  rows = examples(task, split)
  return tf.data.Dataset.from_tensor_slices(
    {k: [r[k] for r in rows] for k in ("inputs", "targets")}
  )


def _exact_match(targets, predictions):
  return {"exact_match": 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)}


def _register() -> None:
  features = {k: seqio.Feature(vocabulary(), add_eos=True) for k in ("inputs", "targets")}
  for task in TASKS:
    if task in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
      task,
      source=seqio.FunctionDataSource(
        functools.partial(_dataset_fn, task=task), splits=tuple(_SIZES)
      ),
      preprocessors=[
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=features,
      metric_fns=[_exact_match],
    )


_register()

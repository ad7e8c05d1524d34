"""Test configuration and the NumPy reference shared by the tests.

Every test runs with strict dtype promotion and rank promotion as an error, as equinox's tests do;
warnings are errors (``filterwarnings`` in pyproject.toml).
"""

import math

import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield


def _axes(axis, ndim):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def _grouped(x, m, axis):
  """``x`` as ``(before, groups, m, after)``: groups of ``m`` along the row-major flattened axes."""
  axes = _axes(axis, x.ndim)
  before = math.prod(x.shape[: axes[0]])
  size = math.prod(x.shape[a] for a in axes)
  after = math.prod(x.shape[axes[-1] + 1 :])
  return x.reshape(before, size // m, m, after)


def reference_nm_mask(x, n, m, axis=0):
  """N:M mask by a stable sort of ``-|x|`` in every group: the ``n`` first are kept."""
  x = np.asarray(x).astype(np.float64)
  magnitudes = _grouped(np.abs(x), m, axis)
  order = np.argsort(-magnitudes, axis=2, kind="stable")
  mask = np.zeros(magnitudes.shape, bool)
  np.put_along_axis(mask, order[:, :, :n], True, axis=2)
  return mask.reshape(x.shape)


def reference_group_counts(x, m, axis=0):
  """Number of nonzeros in every group of ``m`` along ``axis``."""
  return np.count_nonzero(_grouped(np.asarray(x), m, axis), axis=2)


@pytest.fixture
def nm_reference():
  """The NumPy N:M mask reference, ``(x, n, m, axis) -> bool array``."""
  return reference_nm_mask


@pytest.fixture
def group_counts():
  """Nonzeros per group of ``m`` along an axis, ``(x, m, axis) -> int array``."""
  return reference_group_counts

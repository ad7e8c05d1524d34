"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def interleaved_medians(
  fns: Sequence[Callable[[], object]], *, reps: int, rounds: int = 3
) -> list[float]:
  """Median seconds of each zero-argument ``fn``, timed in alternating rounds.

  Alternating the candidates cancels slow drifts of the machine (other processes, clocks)
  that would otherwise bias whichever ran later.
  """
  for fn in fns:
    jax.block_until_ready(fn())
  samples = [[] for _ in fns]
  for _ in range(rounds):
    for i, fn in enumerate(fns):
      for _ in range(max(reps // rounds, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples[i].append(time.perf_counter() - start)
  return [float(np.median(s)) for s in samples]


def device_description() -> str:
  """The device kind and the JAX version, e.g. 'NVIDIA H100 80GB HBM3, JAX 0.11.2'."""
  device = jax.devices()[0]
  kind = device.device_kind
  if device.platform == "cpu":
    import os

    kind = f"CPU ({os.cpu_count()} cores)"
  return f"{kind}, JAX {jax.__version__}"

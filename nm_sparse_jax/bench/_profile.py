"""GPU kernel time of jitted callables, read from a ``jax.profiler`` trace.

Wall-clock time of a small JAX call on a GPU is mostly host dispatch (a few µs per kernel that
XLA cannot put in a CUDA graph, such as a Pallas kernel). The device's own time is the sum of
the kernel durations on its streams, which the profiler records. The candidates run one after
the other inside one trace, separated by idle gaps, so that each candidate's kernels form one
cluster in time.
"""

from __future__ import annotations

import glob
import gzip
import json
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = ["gpu_kernel_seconds", "gpu_kernel_times", "l2_flusher"]


def _stream_events(trace: dict) -> list[dict]:
  """Complete events on the GPU streams (kernels, memsets, copies) of a perfetto trace."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpu_pids = {
    e["pid"]
    for e in events
    if e.get("ph") == "M"
    and e.get("name") == "process_name"
    and "gpu" in str(e.get("args", {}).get("name", "")).lower()
  }
  threads = {
    (e["pid"], e.get("tid")): str(e.get("args", {}).get("name", ""))
    for e in events
    if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu_pids
  }
  streams = {key for key, name in threads.items() if name.lower().startswith("stream")}
  if not streams:  # no stream lines: every GPU line except the derived XLA op/module lines
    streams = {key for key, name in threads.items() if "xla" not in name.lower()}
  return [
    e
    for e in events
    if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams and e.get("dur") is not None
  ]


def _per_candidate(
  events: list[dict], n: int, calls: int, gap_s: float, flushed: bool = False
) -> list[dict] | None:
  """Split time-sorted stream ``events`` at idle gaps longer than ``gap_s / 2`` into ``n``
  clusters (``flushed``: ``2 * calls`` per candidate, a flush then a call, the flushes
  dropped); per candidate, seconds per call of each kernel name. None if the clusters do not
  match the candidates one to one."""
  if not events:
    return None
  clusters, end = [[events[0]]], events[0]["ts"] + events[0]["dur"]
  for e in events[1:]:
    if e["ts"] - end > gap_s * 1e6 / 2:
      clusters.append([])
    clusters[-1].append(e)
    end = max(end, e["ts"] + e["dur"])
  if len(clusters) != (2 * calls * n if flushed else n):
    return None
  if flushed:  # [flush, call] * calls per candidate: keep the calls, one group per candidate
    calls_only = clusters[1::2]
    clusters = [sum(calls_only[i * calls : (i + 1) * calls], []) for i in range(n)]
  times = []
  for cluster in clusters:
    per_name = {}
    for e in cluster:
      name = str(e.get("name", "?"))
      per_name[name] = per_name.get(name, 0.0) + e["dur"] * 1e-6 / calls
    times.append(per_name)
  return times


def l2_flusher(nbytes: int = 256 << 20) -> Callable[[], jax.Array]:
  """A callable that reads and writes an ``nbytes`` device buffer (``b + 1``, donated), evicting
  what an earlier call left in the GPU's L2 cache (50 MB on an H100) before the next timed call.
  """
  state = [jnp.zeros(nbytes // 4, jnp.uint32)]
  step = jax.jit(lambda b: b + 1, donate_argnums=0)

  def flush() -> jax.Array:
    state[0] = step(state[0])
    return state[0]

  return flush


def gpu_kernel_times(
  fns: Sequence[Callable[[], object]],
  *,
  calls: int = 10,
  gap_s: float = 0.005,
  flush: Callable[[], object] | None = None,
) -> list[dict] | None:
  """Seconds of GPU stream activity per call of each ``fn``, by kernel name (XLA fusions,
  Pallas kernels, memsets, copies), or None if the trace has none.

  Each ``fn`` is warmed up, then called ``calls`` times (synchronised at the end) inside one
  profiler trace, with ``gap_s`` of idle time between candidates. The stream events are split at
  gaps longer than ``gap_s / 2`` into one cluster per candidate; if the clusters do not match the
  candidates one to one, None is returned rather than a misattributed time. With ``flush`` (e.g.
  :func:`l2_flusher`), every call comes after a flush, each in its own cluster, and only the
  calls are counted: nothing the call reads is in L2 from an earlier call.
  """
  if jax.default_backend() != "gpu":
    return None
  for fn in fns:
    jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for fn in fns:
        time.sleep(gap_s)
        if flush is None:
          jax.block_until_ready([fn() for _ in range(calls)])
          continue
        for _ in range(calls):
          jax.block_until_ready(flush())
          time.sleep(gap_s)
          jax.block_until_ready(fn())
          time.sleep(gap_s)
      time.sleep(gap_s)
    paths = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
      return None
    with gzip.open(paths[0]) as f:
      trace = json.load(f)
  events = sorted(_stream_events(trace), key=lambda e: e["ts"])
  return _per_candidate(events, len(fns), calls, gap_s, flushed=flush is not None)


def gpu_kernel_seconds(
  fns: Sequence[Callable[[], object]],
  *,
  calls: int = 10,
  gap_s: float = 0.005,
  flush: Callable[[], object] | None = None,
) -> list[float] | None:
  """Total seconds of GPU stream activity per call of each ``fn`` (:func:`gpu_kernel_times`
  summed over the kernels), or None."""
  times = gpu_kernel_times(fns, calls=calls, gap_s=gap_s, flush=flush)
  return None if times is None else [sum(t.values()) for t in times]

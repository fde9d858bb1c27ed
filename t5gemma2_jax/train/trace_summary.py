"""Where a compiled program's time goes, read from a `jax.profiler` trace as text.

`trace(fn, steps)` runs `fn` under `jax.profiler.trace` (with the Perfetto JSON the profiler writes
beside its protobuf) and `summarize` adds up the trace's op events: per name, and per kind of work
(matmuls, attention kernels, collectives, copies, the rest), as a share of the time the device was
busy. On a GPU the events are the device's own (its `/device:GPU:N` tracks: the XLA op track where
the trace has one, else the kernels of its streams); on a CPU, the XLA runtime's threads of the host.
The raw trace stays in a temporary directory: the text is what a benchmark keeps.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Kinds of work, matched against an op's (or kernel's) name, first match wins. cuBLAS, CUTLASS and
# cuDNN kernels carry their library's mark in the name; XLA's own ops carry the HLO opcode.
KINDS = (
    ("attention", re.compile(r"fmha|flash|cudnn|attention|splash|softmax", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|nvjet|xmma|dot|conv|matmul|ynn_fusion", re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|nccl|collective", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose|dynamic-update-slice", re.I)),
)


@dataclass(frozen=True)
class ProfileSummary:
    """Busy seconds of the traced device(s) by op name and by kind of work, over `steps` calls."""

    steps: int
    wall_s: float                        # the traced calls' wall time
    busy_s: float                        # the sum of the op events' durations
    by_name: list[tuple[str, float]] = field(default_factory=list)   # (name, seconds), largest first
    by_kind: dict[str, float] = field(default_factory=dict)
    source: str = ""                     # which tracks were read

    def top(self, n: int = 5) -> list[dict]:
        return [{"name": k, "share": v / self.busy_s if self.busy_s else 0.0} for k, v in self.by_name[:n]]

    def text(self, n: int = 25) -> str:
        lines = [f"traced {self.steps} calls: {self.wall_s:.3f} s wall, {self.busy_s:.3f} s of op events "
                 f"({self.busy_s / self.wall_s:.0%} of the wall time) on {self.source}" if self.wall_s else
                 f"traced {self.steps} calls on {self.source}"]
        lines.append("by kind: " + ", ".join(f"{k} {v / self.busy_s:.1%}" for k, v in
                                             sorted(self.by_kind.items(), key=lambda kv: -kv[1])))
        lines.append(f"{'share':>7} {'ms/call':>9}  op")
        for name, s in self.by_name[:n]:
            lines.append(f"{s / self.busy_s:7.1%} {1e3 * s / self.steps:9.3f}  {name[:140]}")
        return "\n".join(lines)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _events(trace_dir: Path) -> list[dict]:
    paths = sorted(trace_dir.glob("**/perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _self_times(events: list[dict]) -> Counter[str]:
    """Seconds per event name, each event counted without the events nested in it on its track
    (a CPU trace nests the ops in the executor's call, and a loop's body in the loop)."""
    totals: Counter[str] = Counter()
    by_track: dict[tuple, list[dict]] = {}
    for e in events:
        by_track.setdefault((e["pid"], e.get("tid")), []).append(e)
    for track in by_track.values():
        track.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        open_events: list[dict] = []    # the enclosing events of the current one, innermost last
        for e in track:
            while open_events and open_events[-1]["ts"] + open_events[-1].get("dur", 0.0) <= e["ts"]:
                open_events.pop()
            seconds = e.get("dur", 0.0) * 1e-6
            totals[e["name"]] += seconds
            if open_events:
                totals[open_events[-1]["name"]] -= seconds
            open_events.append(e)
    return Counter({k: max(v, 0.0) for k, v in totals.items()})


def summarize(trace_dir: Path, steps: int = 1, wall_s: float = 0.0) -> ProfileSummary:
    """Sum the op events of the newest trace under `trace_dir` (see the module docstring)."""
    events = _events(Path(trace_dir))
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in procs.items() if name.startswith("/device:")}
    if devices:
        op_tracks = {k for k, name in threads.items() if k[0] in devices and name == "XLA Ops"}
        tracks = op_tracks or {k for k, name in threads.items() if k[0] in devices and name.startswith("Stream")}
        source = ", ".join(sorted({procs[k[0]] for k in tracks})) + (" (XLA ops)" if op_tracks else " (kernels)")
    else:
        # A CPU trace: the host's XLA runtime threads run the ops; the python thread only dispatches.
        tracks = {k for k, name in threads.items() if name.startswith("tf_XLA")}
        source = "host CPU (XLA runtime threads)"
    totals = _self_times([e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in tracks
                          and not e["name"].startswith("end: ")])
    by_kind: Counter[str] = Counter()
    for name, s in totals.items():
        by_kind[kind_of(name)] += s
    return ProfileSummary(steps=steps, wall_s=wall_s, busy_s=sum(totals.values()), by_name=[(k, v) for k, v in totals.most_common() if v > 0],
                          by_kind=dict(by_kind), source=source or "no tracks found")


def trace(fn: Callable[[], object], steps: int = 2) -> ProfileSummary:
    """Call `fn` (which blocks until its work is done) `steps` times under the profiler; the trace
    is summarised and removed."""
    import time

    import jax

    with tempfile.TemporaryDirectory(prefix="t5gemma2_trace_") as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            wall = time.perf_counter() - t
        return summarize(Path(tmp), steps, wall)

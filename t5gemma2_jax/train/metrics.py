"""Metrics out: `WORKDIR/metrics.jsonl` (one JSON object per logged step), TensorBoard event files
under `WORKDIR/tensorboard/`, a Weights & Biases run when one is given (`train/tracking`), and a
tqdm progress bar. Only process 0 writes.

A train row carries the step's metrics and the data's counters (`records_seen`, `examples`,
`skipped/<reason>`, ...: `t5gemma2_jax.data.counters`), which TensorBoard shows under `data/`.

On resume from step N, lines of metrics.jsonl with a step > N (written by the interrupted run after
its last checkpoint) are dropped, and TensorBoard is told to purge events after N, so both read as
one uninterrupted run.

An object store has no append (gcsfs "appends" by overwriting, keeping only the last row), so a
work directory there gets `WORKDIR/metrics/<n>.jsonl` instead: one object per write, numbered in
order, which `read_metrics` reads back as the one file. TensorBoard event files are written by
tensorboardX, which writes `gs://` itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

from t5gemma2_jax import storage
from t5gemma2_jax.data.counters import COUNTER_NAMES

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
METRICS_DIR = "metrics"          # in an object store: one object per write


def _object_name(n: int) -> str:
    return f"{n:09d}.jsonl"


def tensorboard_tag(key: str) -> str:
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key in COUNTER_NAMES:
        return "data/" + key
    return "train/" + key


def skipped_share(metrics: Mapping[str, Any]) -> float | None:
    """Skipped records / records seen, from a row's data counters (None without counters)."""
    seen = metrics.get("records_seen")
    if not seen:
        return None
    return sum(v for k, v in metrics.items() if k.startswith("skipped/")) / seen


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def has_metrics(workdir: str | os.PathLike) -> bool:
    if storage.is_url(workdir):
        return bool(_metric_objects(workdir))
    return (storage.as_path(workdir) / METRICS_FILE).is_file()


def _metric_objects(workdir) -> list[str]:
    return [p for p in storage.files_under(storage.join(workdir, METRICS_DIR)) if p.endswith(".jsonl")]


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    if storage.is_url(workdir):
        return _parse(b"".join(storage.read_many(_metric_objects(workdir))).decode())
    path = storage.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return _parse(path.read_text())


def _parse(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch when it is
    installed, only to accept torch tensors (these metrics are floats), and importing torch takes
    seconds at the start of every run; with `sys.modules["torch"] = None` its `import torch`
    fails fast, as on a machine without torch. Nothing else is imported meanwhile."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True,
                 enabled: bool = True, tracker=None):
        self.enabled = enabled
        self.workdir = storage.as_path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.remote = storage.is_url(workdir)
        self._next = 0            # the number of the next object (object store)
        self.tb = None
        self.tracker = tracker if enabled else None   # a `tracking.WandbRun`: gets what TensorBoard gets
        if not enabled:
            return
        if self.remote:
            self._truncate_objects(resume_step)
        else:
            self._truncate(resume_step)
        if tensorboard:
            try:
                SummaryWriter = _summary_writer_class()
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files "
                            "(pip install tensorboardX)")
            else:
                self.tb = SummaryWriter(str(self.workdir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        rows = read_metrics(self.path.parent)
        keep = [r for r in rows if r.get("step", 0) <= resume_step]
        if len(keep) != len(rows) or self.path.read_text().count("\n") != len(rows):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)

    def _truncate_objects(self, resume_step: int) -> None:
        names = _metric_objects(self.workdir)
        for name, data in zip(names, storage.read_many(names)):
            rows = _parse(data.decode())
            keep = [r for r in rows if r.get("step", 0) <= resume_step]
            if not keep:
                storage.remove(name)
            elif len(keep) != len(rows):
                storage.write_text(name, "".join(json.dumps(r) + "\n" for r in keep))
        if names:
            self._next = int(names[-1].rsplit("/", 1)[-1].split(".")[0]) + 1

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if self.remote:
            storage.write_text(self.workdir / METRICS_DIR / _object_name(self._next), json.dumps(row) + "\n")
            self._next += 1
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        scalars = {tensorboard_tag(k): v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, int(step))
            self.tb.flush()
        if self.tracker is not None and scalars:
            self.tracker.log(int(step), scalars)

    def write_text(self, step: int, tag: str, rows: list[dict]) -> None:
        """Rows of text (sample predictions) as one TensorBoard text entry (metrics.jsonl holds
        them as a list already)."""
        if self.enabled and self.tb is not None and rows:
            self.tb.add_text(tag, "\n\n".join(" | ".join(f"**{k}**: {v}" for k, v in r.items()) for r in rows),
                             int(step))
            self.tb.flush()
        if self.tracker is not None and rows:
            self.tracker.log_rows(int(step), tag, rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


class Progress:
    """tqdm bar over steps showing loss, tokens/s, TFLOP/s per device, MFU (tqdm adds the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            smoothing=0.1, mininterval=0.5)
        self.last = time.time()

    def update(self, n: int, metrics: Mapping[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        if metrics:
            post = {}
            if "loss" in metrics:
                post["loss"] = f"{metrics['loss']:.4f}"
            if metrics.get("tokens_per_s"):
                post["tok/s"] = f"{metrics['tokens_per_s']:.3g}"
            if metrics.get("tflops_per_device") is not None:
                post["TFLOP/s/dev"] = f"{metrics['tflops_per_device']:.3g}"
            if metrics.get("mfu") is not None:
                post["MFU"] = f"{100 * metrics['mfu']:.1f}%"
            if skipped_share(metrics) is not None:
                post["skipped"] = f"{100 * skipped_share(metrics):.2g}%"
            if metrics.get("nonfinite_steps"):
                post["non-finite"] = int(metrics["nonfinite_steps"])
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

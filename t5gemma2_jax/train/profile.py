"""`train.profile_steps = [first, last]`: a `jax.profiler` trace of those train steps, for
TensorBoard's profile tab, written by process 0 under `WORKDIR/tensorboard/plugins/profile/<run>/`.

The trace starts before step `first` is dispatched and stops once step `last` has finished on the
devices. When the work directory is a URL (`gs://...`) the trace goes to a local temporary
directory and is copied there afterwards through etils `epath`, the layer the run's other files
use: the profiler writes URLs with its own client, which reads neither the storage emulator's
variables nor fsspec's configuration.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
from etils import epath

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def copy_tree(local: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Every file under `local` to the same relative path under `dest` (a path or a URL), each
    written whole; the destination paths, in order."""
    local, out = Path(local), []
    for src in sorted(p for p in local.rglob("*") if p.is_file()):
        target = epath.Path(str(dest)) / src.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        out.append(str(target))
    return out


class StepProfiler:
    """`with profiler.trace(step):` around dispatching a step (starts the trace at `first`, and
    marks each traced step for TensorBoard's step view), `after(step, outputs)` once it is
    dispatched; used as a context manager so that a run stopping inside the window still ends the
    trace."""

    def __init__(self, steps: tuple[int, ...], workdir: str | os.PathLike, *, enabled: bool = True):
        self.first, self.last = (steps[0], steps[1]) if steps and enabled else (None, None)
        self.logdir = f"{str(workdir).rstrip('/')}/{TENSORBOARD_DIR}"
        self._local: str | None = None
        self._tmp: str | None = None

    def __enter__(self):
        return self

    def trace(self, step: int):
        if step == self.first and self._local is None:
            self._start()
        if self._local is None:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def _start(self) -> None:
        if is_url(self.logdir):
            self._tmp = tempfile.mkdtemp(prefix="t5gemma2_profile_")
            self._local = self._tmp
        else:
            self._local = self.logdir
        jax.profiler.start_trace(self._local)
        log.info("profiling steps %d-%d into %s", self.first, self.last, self.logdir)

    def after(self, step: int, outputs=None) -> None:
        if self._local is not None and step == self.last:
            jax.block_until_ready(outputs)
            self._stop()

    def _stop(self) -> None:
        local, self._local = self._local, None
        jax.profiler.stop_trace()
        if self._tmp is not None:
            try:
                copied = copy_tree(local, self.logdir)
                log.info("profile trace copied to %s (%d files)", self.logdir, len(copied))
            finally:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def __exit__(self, *exc):
        if self._local is not None:
            self._stop()

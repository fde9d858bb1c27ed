"""Pictures of a run from its `metrics.jsonl`: `WORKDIR/loss.png` (train and eval loss against the
step, the learning rate below) and overlays of one metric across several runs (ablations).

Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`), never
through `pyplot`, so plotting from a notebook or a training run leaves the user's backend and
current figure alone. Files are written to a temporary name and renamed (in an object store: one
whole object), so a reader (a browser, an image viewer refreshing) never sees half a PNG.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Sequence

from t5gemma2_jax import storage
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.figures import figure, save_png
from t5gemma2_jax.storage import AnyPath
from t5gemma2_jax.train.metrics import METRICS_FILE, has_metrics, read_metrics

log = logging.getLogger(__name__)

LOSS_PLOT = "loss.png"
LR_KEY = "lr"          # the learning rate in a train row (train/step.py)


class PlotError(ConfigError):
    """Nothing to draw: no work directory, no metrics.jsonl, or no row with the metric. A
    ConfigError, so that command lines report it in one line."""


def series(rows: Iterable[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows holding a finite number under `metric`; a non-finite value is
    stored as a string ("nan") and left out."""
    steps, values = [], []
    for r in rows:
        v = r.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def run_rows(workdir: str | os.PathLike) -> list[dict]:
    """The rows of `workdir/metrics.jsonl`; PlotError when the directory or the file is missing."""
    workdir = storage.as_path(workdir)
    if not workdir.is_dir():
        raise PlotError(f"{workdir}: not a directory")
    if not has_metrics(workdir):
        raise PlotError(f"{workdir}: no {METRICS_FILE} (is it the --workdir of a training run?)")
    return read_metrics(workdir)


def _require(found: bool, what: str, workdir: AnyPath, rows: list[dict]) -> None:
    if not found:
        keys = sorted({k for r in rows for k in r if k != "step"})
        raise PlotError(f"{workdir / METRICS_FILE}: no row has a number under {what} "
                        f"(keys there: {', '.join(keys) or 'none'})")


def plot_run(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> AnyPath:
    """Draws train and eval loss against the step, with the learning rate in a panel below, to
    `out` (default `workdir/loss.png`); returns the file written."""
    workdir = storage.as_path(workdir)
    rows = run_rows(workdir)
    train_steps, train_loss = series(rows, "loss")
    eval_steps, eval_loss = series(rows, "eval_loss")
    # A fine-tune evaluates at step 0, before its first train row: that picture is one point.
    _require(bool(train_steps or eval_steps), "'loss' or 'eval_loss'", workdir, rows)
    lr_steps, lr = series(rows, LR_KEY)

    fig = figure(5.0 if lr else 3.5)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1]) if lr else [fig.subplots()]
    ax = axes[0]
    if train_steps:
        ax.plot(train_steps, train_loss, label="train loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss")
    ax.set_ylabel("cross-entropy")
    ax.set_title(_name(workdir))
    ax.grid(alpha=0.3)
    ax.legend()
    if lr:
        axes[1].plot(lr_steps, lr, color="tab:gray")
        axes[1].set_ylabel("learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return save_png(fig, storage.as_path(out) if out is not None else workdir / LOSS_PLOT)


def _name(workdir: AnyPath) -> str:
    return workdir.name if storage.is_url(workdir) else workdir.resolve().name


def _run_names(workdirs: Sequence[AnyPath]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [_name(w) for w in workdirs]
    return [str(w) if names.count(n) > 1 else n for w, n in zip(workdirs, names)]


def plot_runs(workdirs: Sequence[str | os.PathLike], out: str | os.PathLike, metric: str = "loss") -> AnyPath:
    """Overlays `metric` against the step for several runs, named by their directories in the
    legend; returns `out`. Every run must have the metric (PlotError names the first that has not)."""
    workdirs = [storage.as_path(w) for w in workdirs]
    if not workdirs:
        raise PlotError("no work directory to plot")
    curves = []
    for w in workdirs:
        rows = run_rows(w)
        steps, values = series(rows, metric)
        _require(bool(steps), repr(metric), w, rows)
        curves.append((steps, values))

    fig = figure(4.0)
    ax = fig.subplots()
    for name, (steps, values) in zip(_run_names(workdirs), curves):
        ax.plot(steps, values, "o-" if len(steps) <= 20 else "-", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, storage.as_path(out))


def save_loss_plot(workdir: str | os.PathLike, *, enabled: bool = True) -> AnyPath | None:
    """`plot_run(workdir)` for the training loop: a picture that cannot be drawn (no matplotlib, a
    full disk, ...) is a warning, never the end of a run. None when disabled or failed."""
    if not enabled:
        return None
    try:
        return plot_run(workdir)
    except Exception as e:  # noqa: BLE001 - training goes on whatever went wrong with the picture
        log.warning("could not write %s: %s: %s", storage.as_path(workdir) / LOSS_PLOT, type(e).__name__, e)
        return None

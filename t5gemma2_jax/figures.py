"""Figures for runs and comparisons: an off-screen matplotlib figure and its atomic PNG save."""

from __future__ import annotations

import os
from pathlib import Path


def figure(height: float):
    """A 7-inch-wide matplotlib figure drawn off-screen (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out: Path) -> Path:
    """`fig` as a PNG at `out`, replaced atomically (a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

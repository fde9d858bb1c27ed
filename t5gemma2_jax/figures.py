"""Figures for runs and comparisons: an off-screen matplotlib figure and its atomic PNG save."""

from __future__ import annotations

import io

from t5gemma2_jax import storage


def figure(height: float):
    """A 7-inch-wide matplotlib figure drawn off-screen (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out):
    """`fig` as a PNG at `out` (a local path or a `storage` URL), written as one whole object: a
    reader never sees half a file."""
    if storage.is_local(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    storage.write_bytes(out, png.getvalue())
    return out

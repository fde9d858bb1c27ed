"""Several runs' results side by side: the JSON files `scripts/evaluate.py --out` writes, as one
markdown table (a row per metric, a column per variant, the best of each row in bold) and one
picture (a panel per metric, a bar per variant).

A variant is a checkpoint: results of one checkpoint on several evaluation files share its column,
and then each row names its file (`textvqa: vqa_accuracy`). Its label is the checkpoint's directory
name (a step directory: `run@step`) unless names are given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.figures import figure, save_png

# Counts that describe the evaluation rather than score the model.
BOOKKEEPING = frozenset({"step", "tokens", "batches", "records_seen", "examples", "records"})
# Lower is better for these (and for every per-task loss); higher for the rest.
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def read_results(path: str | Path) -> dict:
    p = Path(path)
    try:
        results = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not a results JSON file ({e})") from None
    if not isinstance(results, dict) or "checkpoint" not in results:
        raise ConfigError(f"{p}: not a results file of scripts/evaluate.py (no 'checkpoint')")
    return results


def scores(results: dict) -> dict[str, float]:
    """The numbers that score the model: top-level metrics and each UL2 task's loss."""
    out = {k: float(v) for k, v in results.items()
           if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for task, values in (results.get("per_task") or {}).items():
        for k in ("loss", "perplexity"):
            if isinstance(values.get(k), (int, float)):
                out[f"{k} ({task})"] = float(values[k])
    return out


def _label(results: dict) -> str:
    path = Path(results["checkpoint"])
    if path.parent.name == "checkpoints":            # a step directory: the run's name and the step
        return f"{path.parent.parent.name}@{path.name}"
    return path.name if path.name not in ("export", "") else f"{path.parent.name}/{path.name}"


def compare(paths: Sequence[str | Path], names: Sequence[str] | None = None,
            metrics: Sequence[str] | None = None) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(variants, rows, {(row, variant): value}) of the results files `paths`; `names` label the
    files' checkpoints in order of first appearance, `metrics` choose and order the metrics."""
    if not paths:
        raise ConfigError("no results file to compare")
    all_results = [(Path(p), read_results(p)) for p in paths]
    checkpoints = list(dict.fromkeys(r["checkpoint"] for _, r in all_results))
    if names is not None:
        if len(names) != len(checkpoints):
            raise ConfigError(f"--names: {len(names)} names for {len(checkpoints)} checkpoints ({', '.join(checkpoints)})")
        label = dict(zip(checkpoints, names))
    else:
        labels = {c: _label(r) for _, r in all_results for c in [r["checkpoint"]]}
        label = {c: (labels[c] if list(labels.values()).count(labels[c]) == 1 else c) for c in checkpoints}
    several_files = len({r.get("data") for _, r in all_results}) > 1
    values: dict[tuple[str, str], float] = {}
    rows: list[str] = []
    for path, results in all_results:
        prefix = f"{Path(str(results.get('data') or path)).stem}: " if several_files else ""
        for metric, value in scores(results).items():
            if metrics is not None and metric not in metrics:
                continue
            row = prefix + metric
            if (row, label[results["checkpoint"]]) in values:
                raise ConfigError(f"{path}: a second result for {row!r} of {label[results['checkpoint']]}")
            values[row, label[results["checkpoint"]]] = value
            if row not in rows:
                rows.append(row)
    if metrics is not None:
        missing = [m for m in metrics if not any(r == m or r.endswith(": " + m) for r in rows)]
        if missing:
            raise ConfigError(f"--metrics: no results file has {missing}")
        order = {m: i for i, m in enumerate(metrics)}
        rows.sort(key=lambda r: (r.rsplit(": ", 1)[0] if ": " in r else "", order[r.rsplit(": ", 1)[-1]]))
    if not rows:
        raise ConfigError("the results files hold no metric to compare")
    return [label[c] for c in checkpoints], rows, values


def _lower_is_better(row: str) -> bool:
    return row.rsplit(": ", 1)[-1].split(" (")[0] in LOWER_IS_BETTER


def markdown_table(variants: list[str], rows: list[str], values: dict[tuple[str, str], float]) -> str:
    """A row per metric, a column per variant; the best value of a row in bold (lowest loss and
    perplexity, highest otherwise) when two or more variants have it; '-' where one has none."""
    lines = ["| metric | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for row in rows:
        have = [values[row, v] for v in variants if (row, v) in values and math.isfinite(values[row, v])]
        best = (min if _lower_is_better(row) else max)(have) if len(have) > 1 else None
        cells = []
        for v in variants:
            x = values.get((row, v))
            text = "-" if x is None else f"{x:.4g}"
            cells.append(f"**{text}**" if best is not None and x == best else text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(variants: list[str], rows: list[str], values: dict[tuple[str, str], float],
                    out: str | Path) -> Path:
    """One panel per metric (its own scale), one bar per variant in the same colour in every panel."""
    cols = min(3, len(rows))
    grid = -(-len(rows) // cols)
    fig = figure(2.6 * grid)
    fig.set_figwidth(3.4 * cols)
    axes = fig.subplots(grid, cols, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(variants))]
    for ax, row in zip(axes.flat, rows):
        xs = [i for i, v in enumerate(variants) if (row, v) in values]
        ax.bar(xs, [values[row, variants[i]] for i in xs], color=[colours[i] for i in xs])
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right", fontsize=8)
        ax.set_title(row + (" (lower is better)" if _lower_is_better(row) else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.set_visible(False)
    return save_png(fig, Path(out))

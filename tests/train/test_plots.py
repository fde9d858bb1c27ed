"""Pictures of runs: WORKDIR/loss.png from metrics.jsonl, overlays of several runs, scripts/plot.py's
one-line errors, and the loop drawing loss.png (a plotting failure is only a warning)."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import pytest

from t5gemma2_jax.train import plots
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG whose every chunk's CRC checks out (a whole, valid file)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    i, chunks = 8, []
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[i + 8 + n:i + 12 + n])[0], kind
        chunks.append((kind, body))
        i += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return struct.unpack(">II", chunks[0][1][:8])


def _workdir(path: Path, steps: int = 20, eval_every: int = 5, loss0: float = 6.0) -> Path:
    """A run's metrics.jsonl as the loop writes it: train rows with loss and lr, eval rows, a
    non-finite loss stored as a string, a line cut by a kill."""
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        loss = "nan" if s == 7 else loss0 / s
        lines.append(json.dumps({"step": s, "loss": loss, "loss_avg": loss0 / s, "lr": 1e-3 * min(1, s / 4)}))
        if s % eval_every == 0:
            lines.append(json.dumps({"step": s, "eval_loss": loss0 / s + 0.2, "eval_tokens": 64.0}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')
    return path


def test_series_keeps_finite_numbers_only():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": "nan"}, {"step": 3, "eval_loss": 1.0},
            {"step": 4, "loss": True}, {"step": 5, "loss": 1}]
    assert plots.series(rows, "loss") == ([1, 5], [2.0, 1.0])


def test_plot_run_writes_a_valid_png(tmp_path):
    run = _workdir(tmp_path / "run")
    out = plots.plot_run(run)
    assert out == run / "loss.png"
    width, height = _png_size(out)
    assert (width, height) == (700, 500)               # 7 x 5 inches at 100 dpi: the lr panel is there
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_plot_run_without_eval_or_lr_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3)))
    assert _png_size(plots.plot_run(run, tmp_path / "elsewhere" / "x.png")) == (700, 350)


def test_plot_run_at_a_fine_tunes_first_evaluation(tmp_path):
    """Step 0's evaluation comes before any train row: one eval point, no error."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 2.5}) + "\n")
    assert _png_size(plots.plot_run(run)) == (700, 350)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_tokens": 3.0}) + "\n")
    with pytest.raises(plots.PlotError, match="no row has a number under 'loss' or 'eval_loss'"):
        plots.plot_run(run)


def test_plot_leaves_pyplot_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    plots.plot_run(_workdir(tmp_path / "run"))
    plots.plot_runs([tmp_path / "run"], tmp_path / "o.png")
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures


def test_plot_runs_overlays_runs_named_by_their_directories(tmp_path):
    a, b = _workdir(tmp_path / "merged"), _workdir(tmp_path / "separate", steps=10, loss0=7.0)
    out = plots.plot_runs([a, b], tmp_path / "eval.png", metric="eval_loss")
    assert out == tmp_path / "eval.png" and _png_size(out) == (700, 400)
    assert plots._run_names([a, b]) == ["merged", "separate"]
    twins = [_workdir(tmp_path / "x" / "run"), _workdir(tmp_path / "y" / "run")]
    assert plots._run_names(twins) == [str(t) for t in twins]


@pytest.mark.parametrize("case, expect", [
    ("missing", "not a directory"),
    ("empty", "no metrics.jsonl"),
    ("metric", "no row has a number under 'eval_bleu' (keys there: eval_loss, eval_tokens, loss, loss_avg, lr)"),
])
def test_plot_errors_name_the_problem(tmp_path, case, expect):
    run = tmp_path / "run"
    if case == "empty":
        run.mkdir()
    if case == "metric":
        _workdir(run)
    with pytest.raises(plots.PlotError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        plots.plot_runs([run], tmp_path / "o.png", metric="eval_bleu")


def test_script_writes_loss_png_and_overlays(tmp_path, capsys):
    script = load_script("plot")
    a, b = _workdir(tmp_path / "a"), _workdir(tmp_path / "b", steps=12)
    assert script.main([str(a)]) == 0
    assert capsys.readouterr().out == f"wrote {a / 'loss.png'}\n" and _png_size(a / "loss.png")
    assert script.main([str(a), str(b), "--metric", "lr", "--out", str(tmp_path / "lr.png")]) == 0
    assert _png_size(tmp_path / "lr.png")
    assert script.main([str(a), "--metric", "eval_loss"]) == 0
    assert _png_size(a / "eval_loss.png")


@pytest.mark.parametrize("args, expect", [
    (["{a}", "--metric", "bleu"], "error: {a}/metrics.jsonl: no row has a number under 'bleu'"),
    (["{a}", "{tmp}/nowhere"], "error: --out: name the PNG to write when plotting several work directories"),
    (["{a}", "{tmp}/nowhere", "--out", "{tmp}/o.png"], "error: {tmp}/nowhere: not a directory"),
    (["{tmp}"], "error: {tmp}: no metrics.jsonl"),
])
def test_script_errors_are_one_line_and_exit_2(tmp_path, capsys, args, expect):
    a = _workdir(tmp_path / "a")
    fill = lambda s: s.format(a=a, tmp=tmp_path)  # noqa: E731
    assert load_script("plot").main([fill(x) for x in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(fill(expect)) and err.count("\n") == 1, err


def test_a_plot_that_fails_during_training_is_a_warning(tmp_path, monkeypatch, caplog):
    def broken(*a, **kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(plots, "plot_run", broken)
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        assert plots.save_loss_plot(_workdir(tmp_path / "run")) is None
    assert "could not write" in caplog.text and "OSError: No space left on device" in caplog.text
    assert plots.save_loss_plot(tmp_path / "run", enabled=False) is None


@pytest.mark.slow
def test_training_draws_loss_png_and_a_failed_picture_does_not_stop_it(tmp_path, monkeypatch, caplog):
    """The loop redraws loss.png at each evaluation and at the end; the drawing at the evaluation
    fails here (a warning), the run goes on and the one at the end lands."""
    from helpers import small_config
    from t5gemma2_jax.train import train
    from t5gemma2_jax.train.data import SyntheticBatches

    real, calls = plots.plot_run, []

    def first_fails(workdir, out=None):
        calls.append(workdir)
        if len(calls) == 1:
            raise RuntimeError("the backend fell over")
        return real(workdir, out)

    monkeypatch.setattr(plots, "plot_run", first_fails)
    cfg = small_config(train={"steps": 1, "eval_every": 1, "checkpoint_every": 1, "tensorboard": False})
    model = cfg.model_config()
    evals = lambda: SyntheticBatches(cfg.data, model, split="eval", eval_batches=1)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        summary = train(cfg, tmp_path, batches=SyntheticBatches(cfg.data, model), eval_batches=evals)
    assert summary.step == 1 and len(calls) == 2          # the evaluation at step 1, then the end
    assert "RuntimeError: the backend fell over" in caplog.text
    assert _png_size(tmp_path / "loss.png") == (700, 500)

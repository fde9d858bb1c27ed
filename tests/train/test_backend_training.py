"""Every attention backend through the trainer's compiled train and eval steps, with a checkpoint
and a resume, also under `mesh.context`, and through `scripts/evaluate.py` on the run it trained:
each equal to `dense` (the model's own paths, one test per backend in the default tier:
`tests/test_backend_paths.py`). All are slow tests. Two devices: the layouts are not what these
tests are about."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from backend_cases import BLOCKS, OTHERS, auto_picks_blockwise  # noqa: F401 (an autouse fixture)
from helpers import batch_for, small_config

import t5gemma2_jax as tg
from t5gemma2_jax.train import Trainer
from t5gemma2_jax.train.loop import train
from scripts_loader import load_script

TWO = {"data": 1, "fsdp": 2, "context": 1, "tensor": 1}
CONTEXT = {"data": 1, "fsdp": 1, "context": 2, "tensor": 1}


def _config(backend: str, mesh: dict = TWO, **train):
    return small_config(model={"attention_backend": backend, "attention_block_size": BLOCKS[backend]}, mesh=mesh,
                        train={"eval_every": 2, **train})


def _steps(backend: str) -> list[float]:
    """Four train steps and an eval step through `Trainer.build`'s compiled steps."""
    cfg = _config(backend)
    trainer = Trainer.build(cfg, devices=jax.devices()[:2])
    steps = trainer.compile()
    state, out = trainer.init_state(), []
    for i in range(4):
        state, metrics = steps.train(state, trainer.place_batch(batch_for(cfg, seed=i)))
        out += [float(metrics["loss"]), float(metrics["grad_norm"])]
    sums = steps.eval(state, trainer.place_batch(batch_for(cfg, seed=9)))
    return out + [float(sums["loss_sum"]) / float(sums["tokens"])]


@pytest.mark.slow
def test_splash_train_and_eval_steps_equal_dense():
    """The TPU presets' backend through the ahead-of-time compiled steps (which once refused their
    inputs: the program held the kernel's mask tables as extra inputs no call passed)."""
    np.testing.assert_allclose(_steps("splash"), _steps("dense"), rtol=2e-5)


def _run(workdir, backend: str, mesh: dict = TWO) -> list[dict]:
    """Two steps, a stop, and a resume to four (checkpoint and eval every two steps); the rows of
    metrics.jsonl that have a loss or an eval loss."""
    train(_config(backend, mesh, steps=2), workdir, devices=jax.devices()[:2])
    summary = train(_config(backend, mesh, steps=4), workdir, devices=jax.devices()[:2])
    assert summary.start_step == 2 and summary.step == 4 and summary.last_checkpoint == 4
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "eval_loss") if k in r} for r in rows
            if "loss" in r or "eval_loss" in r]


def _evaluate(workdir, data) -> dict:
    """scripts/evaluate.py on the run: loss, perplexity and greedy generation metrics."""
    return load_script("evaluate").run(["--checkpoint", str(workdir), "--data", str(data), "--encoder-length", "64",
                                        "--decoder-length", "32", "--batch-size", "8", "--generate",
                                        "--max-examples", "3", "--max-new-tokens", "6", "--no-progress"])


def _assert_same_run(got: list[dict], want: list[dict]) -> None:
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in got if "eval_loss" in r] == [2, 4]
    for g, w in zip(got, want):
        for k in g:
            assert g[k] == pytest.approx(w[k], rel=2e-5, abs=1e-6), (g["step"], k)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": f"The river {i} flows slowly through the town."}) + "\n"
                            for i in range(16)))
    return path


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, heldout):
    workdir = tmp_path_factory.mktemp("dense")
    rows = _run(workdir, "dense")
    return rows, _evaluate(workdir, heldout)


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHERS)
def test_trainer_checkpoint_resume_and_evaluate_script_equal_dense(backend, dense_run, heldout, tmp_path):
    want_rows, want_eval = dense_run
    _assert_same_run(_run(tmp_path, backend), want_rows)
    assert tg.load(tmp_path).config.attention_backend == backend
    got = _evaluate(tmp_path, heldout)
    for k in ("loss", "perplexity", "tokens", "exact_match", "rouge_l"):
        assert got[k] == pytest.approx(want_eval[k], rel=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("backend", BLOCKS)
def test_trainer_under_mesh_context_equals_dense(backend, dense_run, tmp_path):
    """The encoder's positions split over 2 devices (`mesh.context`): each backend's run equals the
    unsplit dense run."""
    _assert_same_run(_run(tmp_path, backend, CONTEXT), dense_run[0])

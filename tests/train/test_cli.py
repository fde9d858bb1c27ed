"""scripts/train.py rejects bad input before compiling anything, with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

import t5gemma2_jax.train as train_pkg
from scripts_loader import load_script
from t5gemma2_jax.train.summary import RunSummary

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def script():
    return load_script("train")


@pytest.fixture
def no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("train() must not be reached")
    monkeypatch.setattr(train_pkg, "train", fail)


def _run(script, capsys, workdir, *overrides, check=False):
    argv = ["--config", TINY, "--workdir", str(workdir), *overrides] + (["--check"] if check else [])
    rc = script.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("overrides, expect", [
    (["train.stepz=5"], "train.stepz: unknown key (did you mean 'train.steps'?)"),
    (["trian.steps=5"], "trian: unknown key"),
    (["train.steps=five"], "train.steps: expected an integer, got 'five'"),
    (["optim.learning_rate=fast"], "optim.learning_rate: expected a number"),
    (["train.progress_bar=maybe"], "train.progress_bar: expected a bool"),
    (["model.encoder.num_layerz=2"], "model.encoder.num_layerz: unknown key"),
    (["model.dtype=int4"], "dtype: 'int4' not in"),
    (["data.batch_size=0"], "data.batch_size"),
    (["mesh.tensor=0"], "mesh.tensor: must be a positive integer or -1"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one axis may be -1"),
    (["train.steps"], "expected dotted.key=value"),
])
def test_bad_config_is_rejected(script, capsys, tmp_path, no_training, overrides, expect):
    rc, err = _run(script, capsys, tmp_path, *overrides)
    assert rc == 2 and expect in err, err


def test_mesh_that_does_not_divide_the_devices(script, capsys, tmp_path, no_training):
    n = len(jax.devices())
    rc, err = _run(script, capsys, tmp_path, "mesh.data=3", "mesh.fsdp=1", "mesh.tensor=1")
    assert rc == 2 and f"there are {n} devices" in err and "mesh.data=3" in err, err
    rc, err = _run(script, capsys, tmp_path, "mesh.data=3", "mesh.fsdp=-1")
    if n % 3:
        assert rc == 2 and "do not divide" in err, err


def test_batch_not_divisible_by_the_data_axes(script, capsys, tmp_path, no_training):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    rc, err = _run(script, capsys, tmp_path, "mesh.data=2", "mesh.fsdp=4", "data.batch_size=12")
    assert rc == 2 and "data.batch_size=12 is not divisible by mesh.data x mesh.fsdp = 8" in err, err
    rc, err = _run(script, capsys, tmp_path, "mesh.fsdp=-1", "data.batch_size=16", "train.microbatches=4")
    assert rc == 2 and "train.microbatches=4" in err, err


def test_unwritable_workdir(script, capsys, tmp_path, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, err = _run(script, capsys, blocker / "run")
    assert rc == 2 and "is not a writable directory" in err and "a_file" in err, err
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if _can_write(ro):
            pytest.skip("running as root: permissions do not stop writes")
        rc, err = _run(script, capsys, ro / "run")
        assert rc == 2 and "is not a writable directory" in err, err
    finally:
        ro.chmod(0o755)


def _can_write(path: Path) -> bool:
    try:
        (path / ".x").write_text("")
        (path / ".x").unlink()
        return True
    except OSError:
        return False


def test_model_and_data_must_agree(script, capsys, tmp_path, no_training):
    rc, err = _run(script, capsys, tmp_path, "data.mm_tokens_per_image=4")
    assert rc == 2 and "data.mm_tokens_per_image: 4 != model mm_tokens_per_image=16" in err, err
    rc, err = _run(script, capsys, tmp_path, "model.with_vision=false")
    assert rc == 2 and "model.with_vision" in err, err
    rc, err = _run(script, capsys, tmp_path, "data.encoder_length=8192")
    assert rc == 2 and "max_position_embeddings" in err, err


def test_check_accepts_a_good_config(script, capsys, tmp_path, no_training):
    rc = script.main(["--config", TINY, "--workdir", str(tmp_path), "--check", "mesh.fsdp=-1"])
    out = capsys.readouterr().out
    assert rc == 0 and "ok: mesh" in out


def test_check_opens_the_data_and_the_tokenizer(script, capsys, tmp_path, no_training):
    rc, err = _run(script, capsys, tmp_path / "w", f"data.train={tmp_path}/missing-*.jsonl",
                   f"data.eval={tmp_path}/missing.jsonl", check=True)
    assert rc == 2 and err.startswith("error: data.train: no data file matches") and err.count("\n") == 1, err
    (tmp_path / "notes.txt").write_text("{}\n")
    rc, err = _run(script, capsys, tmp_path / "w", f"data.train={tmp_path}/notes.txt", "train.eval_every=0",
                   check=True)
    assert rc == 2 and "is neither JSONL" in err, err
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    rc, err = _run(script, capsys, tmp_path / "w", f"data.tokenizer={tmp_path}/bad.model", check=True)
    assert rc == 2 and "data.tokenizer:" in err and "not a usable SentencePiece model" in err, err
    rc, err = _run(script, capsys, tmp_path / "w", f"data.tokenizer={tmp_path}/none.model", check=True)
    assert rc == 2 and "data.tokenizer: no SentencePiece model at" in err, err


def test_closing_summary():
    text = RunSummary(
        start_step=0, step=200, wall_time_s=61.2, loss=0.5, eval_loss=1.1,
        data_stats={"records_seen": 120, "examples": 118, "skipped/malformed_json": 2},
        skip_summary="skipped 2 of 120 records: malformed_json 2 (first at t.jsonl:7)", nonfinite_steps=1,
        checkpoints="/w/checkpoints", last_checkpoint=200, export="/w/export", stopped_by=None).describe()
    assert text.splitlines() == [
        "steps 0 -> 200 in 61 s; train loss 0.5000; eval loss 1.1000",
        "data: 118 examples from 120 records; skipped 2 of 120 records: malformed_json 2 (first at t.jsonl:7)",
        "non-finite steps not applied: 1",
        "checkpoints: /w/checkpoints (latest step 200); export: /w/export"]
    diverged = RunSummary(start_step=0, step=3, wall_time_s=1.0, checkpoints="/c", last_checkpoint=2,
                          stopped_by="divergence", nonfinite_steps=3, last_applied_step=None).describe()
    assert "error: stopped: the loss or gradient was not finite for 3 steps" in diverged
    broken = RunSummary(start_step=2, step=4, wall_time_s=1.0, checkpoints="/c", last_checkpoint=2,
                        stopped_by="divergence", nonfinite_steps=1, last_applied_step=2, broken_at_step=3).describe()
    assert "error: stopped: step 3 left the parameters non-finite (not saved; last good step 2)" in broken
    assert RunSummary(start_step=6, step=6).describe() == "already complete at step 6; nothing to do"


@pytest.mark.slow
def test_too_much_bad_data_ends_the_run_in_one_line(script, capsys, tmp_path):
    """DataQualityError is a user error: one line and exit status 2, not a traceback."""
    path = tmp_path / "bad.jsonl"
    path.write_text("".join("{broken\n" if i % 2 else '{"text": "a red circle is left of a square."}\n'
                            for i in range(60)))
    rc, err = _run(script, capsys, tmp_path / "w", f"data.train={path}", "data.max_images_per_row=0",
                   "data.encoder_length=64", "data.decoder_length=32", "data.bad_fraction_min_records=10",
                   "data.ul2_denoisers=R:3:0.15:1", "train.eval_every=0", "train.steps=2",
                   "model.encoder.num_layers=2", "model.decoder.num_layers=2", "train.progress_bar=false")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "were skipped in the train data" in lines[0], err[-2000:]
    assert "Traceback" not in err

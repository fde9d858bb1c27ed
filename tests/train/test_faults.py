"""Fault injection for training runs: divergence, corrupt and incomplete checkpoints, a missing
data state, read-only and full checkpoint directories, an exception mid-run, Ctrl-C. Each fault
must cost at most the steps since the last good checkpoint, and be reported in one line."""

from __future__ import annotations

import contextlib
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from xla_env import script_env
from helpers import ActAt, small_config
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.train import read_metrics, train
from t5gemma2_jax.train.checkpoint import Checkpointer, CheckpointIOError
from t5gemma2_jax.train.data import SyntheticBatches
from t5gemma2_jax.train.summary import RunSummary
from t5gemma2_jax.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cfg(**train_kw):
    return small_config(train={"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, **train_kw})


def _run(cfg, workdir, batches=None):
    return train(cfg, workdir, batches=batches or SyntheticBatches(cfg.data, cfg.model_config()))


def _all_finite(workdir, cfg) -> bool:
    ck = Checkpointer(workdir / "checkpoints", every=2)
    abstract = Trainer.build(cfg).abstract_state
    ok = all(np.isfinite(np.asarray(x)).all() for s in ck.all_steps()
             for x in jax.tree.leaves(ck.restore(s, abstract).state) if np.issubdtype(x.dtype, np.floating))
    ck.close()
    return ok


class NaNWeightsAt(SyntheticBatches):
    """Synthetic batches whose loss weights are NaN at the given (1-based) batches: a non-finite loss
    and gradient at known steps, as bad data makes them."""

    def __init__(self, *a, bad: set[int], **kw):
        super().__init__(*a, **kw)
        self.bad = bad

    def __next__(self):
        batch = super().__next__()
        if self.index in self.bad:
            batch["decoder_loss_weights"] = np.full_like(batch["decoder_loss_weights"], np.nan)
        return batch


def test_nonfinite_steps_are_not_applied_and_stop_the_run_then_it_resumes(tmp_path):
    cfg = small_config(train={"steps": 8, "checkpoint_every": 2, "keep_checkpoints": 3, "max_nonfinite_steps": 3,
                              "export_at_end": True})
    s = _run(cfg, tmp_path, NaNWeightsAt(cfg.data, cfg.model_config(), bad={1, 2, 3}))
    assert s.diverged and s.stopped_by == "divergence" and s.step == 3 and s.export is None
    assert s.nonfinite_steps == 3 and s.last_applied_step is None and s.broken_at_step is None
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["nonfinite_steps"] for r in rows] == [1, 2, 3]     # counted in metrics.jsonl at each step
    assert Checkpointer(tmp_path / "checkpoints", every=2).all_steps() == [2]
    assert _all_finite(tmp_path, cfg) and not (tmp_path / "export").exists()
    # Resumed on good data, the run trains on from the finite checkpoint.
    good = small_config(train={"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3})
    s = _run(good, tmp_path)
    # The count resumes with the checkpoint: steps 1 and 2 were not applied before it was written.
    assert s.start_step == 2 and s.step == 6 and not s.diverged and s.nonfinite_steps == 2
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path) if r.get("step", 0) > 2 and "loss" in r)


def test_a_step_that_overflows_the_parameters_stops_the_run_before_it_is_saved(tmp_path):
    """A runaway learning rate: finite loss and gradient, parameters whose norm overflows float32.
    The state cannot be undone (it was updated in place), so the run stops before saving it."""
    good = small_config(train={"steps": 2, "checkpoint_every": 2, "keep_checkpoints": 3})
    _run(good, tmp_path)
    bad = small_config(optim={"learning_rate": 1e30, "clip_norm": 0.0, "warmup_steps": 0, "schedule": "constant"},
                       train={"steps": 8, "checkpoint_every": 2, "keep_checkpoints": 3, "export_at_end": True})
    # Step 3's batch is bad (not applied); step 4 is applied and breaks the parameters. Its flags
    # are read late, but before the checkpoint due at step 4.
    s = _run(bad, tmp_path, NaNWeightsAt(bad.data, bad.model_config(), bad={3}))
    assert s.diverged and s.stopped_by == "divergence" and s.broken_at_step == 4 and s.export is None
    assert s.step == 4 and s.last_applied_step == 2 and s.nonfinite_steps == 1
    assert Checkpointer(tmp_path / "checkpoints", every=2).all_steps() == [2]
    assert _all_finite(tmp_path, good) and not (tmp_path / "export").exists()
    s = _run(small_config(train={"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}), tmp_path)
    assert s.start_step == 2 and s.step == 6 and not s.diverged
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path) if r.get("step", 0) > 4 and "loss" in r)


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(ckpt: Path):
    f = _largest_file(ckpt / "state")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(ckpt: Path):
    f = _largest_file(ckpt / "state")
    data = bytearray(f.read_bytes())
    start = len(data) // 3
    for i in range(start, start + 400):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _remove_state(ckpt: Path):
    import shutil

    shutil.rmtree(ckpt / "state")


def _remove_metadata(ckpt: Path):
    for p in ckpt.rglob("*"):
        if p.is_file() and "metadata" in p.name.lower() and "state" not in p.relative_to(ckpt).parts:
            p.unlink()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with complete checkpoints at steps 2 and 4, copied fresh for each test."""
    base = tmp_path_factory.mktemp("base")
    cfg = _cfg()
    _run(cfg, base)
    assert Checkpointer(base / "checkpoints", every=2).all_steps() == [2, 4]
    return base, cfg


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# Orbax abandons the reads of the other arrays when one fails; their coroutines are never awaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate, _flip, _remove_state, _remove_metadata])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(two_checkpoints, tmp_path, caplog, damage):
    base, cfg = two_checkpoints
    work = _copy(base, tmp_path / "run")
    damage(work / "checkpoints" / "4")
    s = _run(small_config(train={"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}), work)
    assert s.start_step == 2 and s.step == 6
    assert "checkpoint 4 in" in caplog.text and "does not restore" in caplog.text
    assert (work / "checkpoints.quarantine" / "4").is_dir()          # set aside, not deleted
    assert Checkpointer(work / "checkpoints", every=2).all_steps()[-1] == 6


def test_no_checkpoint_restores_one_error_naming_the_directory(two_checkpoints, tmp_path):
    base, cfg = two_checkpoints
    work = _copy(base, tmp_path / "run")
    for step in (2, 4):
        _remove_state(work / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match=r"checkpoints: none of the checkpoints \[2, 4\] restores"):
        _run(cfg, work)


def test_a_missing_data_state_is_an_error_unless_allowed(two_checkpoints, tmp_path):
    base, cfg = two_checkpoints
    work = _copy(base, tmp_path / "run")
    (work / "checkpoints" / "4" / "data" / "process_0-of-1.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoints/4: no data-iterator state for process 0 of 1"):
        _run(small_config(train={"steps": 6, "checkpoint_every": 2}), work)
    s = _run(small_config(train={"steps": 6, "checkpoint_every": 2, "allow_data_restart": True}), work)
    assert s.start_step == 4 and s.step == 6


def _break():
    raise RuntimeError("the data source broke")


def test_an_exception_mid_run_leaves_complete_checkpoints_only(tmp_path):
    cfg = _cfg(steps=8)
    with pytest.raises(RuntimeError, match="the data source broke"):
        _run(cfg, tmp_path, ActAt(cfg.data, cfg.model_config(), at=5, action=_break))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["2", "4"], names                         # the async save of step 4 was finished
    s = _run(cfg, tmp_path)
    assert s.start_step == 4 and s.step == 8


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_checkpoint_directory_fails_fast_and_keeps_the_earlier_checkpoint(tmp_path):
    # The disk fills between two checkpoints: checkpoint 2 is written, then a ballast file leaves
    # less room than checkpoint 4 needs (a tmpfs sized to hold "one checkpoint, not two" was at the
    # mercy of how many data files the writer happened to split the first one into).
    work = tmp_path / "run"
    with _tmpfs(work / "checkpoints", "64m") as ckpts:
        _run(_cfg(steps=2), work)
        free = shutil.disk_usage(ckpts).free
        room = 2 * 2**20                                        # below the ~3.5 MiB checkpoint 4 needs
        (ckpts / "ballast").write_bytes(b"\0" * (free - room))
        tic = time.time()
        with pytest.raises(CheckpointIOError, match=r"checkpoint 4: .* MiB free, the checkpoint needs .*"
                                                     r"complete checkpoints: \[2\]"):
            _run(_cfg(steps=6), work)
        assert time.time() - tic < 60                           # compile included; the save fails at once
        (ckpts / "ballast").unlink()
        s = _run(small_config(train={"steps": 2, "checkpoint_every": 2}), work)
        assert s == RunSummary(start_step=2, step=2)   # checkpoint 2 restores


def test_a_read_only_checkpoint_directory_fails_fast(tmp_path):
    cfg = _cfg(steps=4)
    work = tmp_path / "run"
    with _tmpfs(work / "checkpoints", "64m") as ckpts:
        _run(_cfg(steps=2), work)
        subprocess.run(["mount", "-o", "remount,ro", str(ckpts)], check=True)
        tic = time.time()
        with pytest.raises(CheckpointIOError, match=r"checkpoint 4: cannot write to .*Read-only file system; "
                                                     r"complete checkpoints: \[2\]"):
            _run(cfg, work)
        assert time.time() - tic < 60
        subprocess.run(["mount", "-o", "remount,rw", str(ckpts)], check=True)
        assert Checkpointer(ckpts, every=2).all_steps() == [2]


def test_the_space_check_reports_before_orbax_writes(tmp_path, monkeypatch):
    """Without a mount: the pre-flight check refuses a save the disk has no room for."""
    import shutil as shutil_mod

    from t5gemma2_jax.train import checkpoint as ckpt_mod

    ck = Checkpointer(tmp_path, every=1, async_save=False)
    state = {"w": jax.numpy.ones((256, 256))}
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: shutil_mod._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(CheckpointIOError, match=r"checkpoint 1: .* has 0.0 MiB free, the checkpoint needs 1.3 MiB"):
        ck.save(1, state, None, {})
    assert ck.all_steps() == [] and not list(tmp_path.glob("1*"))
    ck.close()


# configs/tiny.yaml cut to 2+2 layers, text only, short rows: the command-line runs below.
SMALL_TINY = ["model.encoder.num_layers=2", "model.decoder.num_layers=2",
              "model.encoder.layer_types=[sliding_attention,full_attention]",
              "model.decoder.layer_types=[sliding_attention,full_attention]",
              "data.max_images_per_row=0", "data.encoder_length=64", "data.decoder_length=32"]


def test_ctrl_c_checkpoints_then_exits_130(tmp_path):
    overrides = [*SMALL_TINY, "train.steps=400", "train.checkpoint_every=1000", "train.log_every=1",
                 "train.eval_every=0", "train.progress_bar=false", "train.export_at_end=false"]
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--workdir", str(tmp_path), *overrides]
    env = script_env()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step", 0) >= 3 for r in read_metrics(tmp_path)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    step = Checkpointer(tmp_path / "checkpoints", every=1000).latest_step()
    assert step is not None and 3 <= step < 400, out[-2000:]   # the steps since the last checkpoint kept
    assert f"stopped at step {step} on SIGINT; rerun the same command to resume" in out


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = b"IDAT" + b"\x00" * 8
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", 8) + idat + struct.pack(">I", zlib.crc32(idat)))


def test_poison_records_are_counted_skips_in_the_metrics(tmp_path):
    """A decompression bomb and a line nested 100000 deep among good records: the run trains on,
    and the skips are in metrics.jsonl at every log step."""
    import base64
    import json

    (tmp_path / "bomb.png").write_bytes(_png_claiming(30_000, 30_000))
    good = [{"text": f"a red circle number {i} is left of a blue square and above a green line."}
            for i in range(40)]
    lines = [json.dumps(r) for r in good[:20]] + [
        json.dumps({"text": "the bomb.", "images": ["bomb.png"]}),
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"text": "an inline bomb.", "images": [
            "data:image/png;base64," + base64.b64encode(_png_claiming(30_000, 30_000)).decode()]}),
    ] + [json.dumps(r) for r in good[20:]]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = small_config(images=True, data={"train": str(tmp_path / "train.jsonl"), "ul2_denoisers": "R:3:0.15:1",
                                          "shuffle": False},
                       train={"steps": 4, "checkpoint_every": 4, "data_source": "pipeline"})
    s = train(cfg, tmp_path / "run")
    assert s.step == 4 and s.stopped_by is None
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all("records_seen" in r and "skipped/corrupt_image" in r for r in rows)
    last = rows[-1]
    assert last["skipped/corrupt_image"] == 2 and last["skipped/malformed_json"] == 1, last
    assert s.data_stats["records_seen"] == last["records_seen"]


class _Closing(SyntheticBatches):
    closed = False

    def close(self):
        self.closed = True


def test_a_failing_eval_step_closes_its_batches(tmp_path, monkeypatch):
    """The eval batches are closed when a step over them fails (a pipeline left open keeps its
    worker processes until the interpreter's exit tears them down)."""
    def broken(self, batch):
        raise RuntimeError("the eval step broke")

    cfg = _cfg(eval_at_start=True, eval_every=2)
    monkeypatch.setattr(Trainer, "place_batch", broken)      # the first batch placed is the step-0 eval's
    eval_batches = _Closing(cfg.data, cfg.model_config(), split="eval")
    with pytest.raises(RuntimeError, match="the eval step broke"):
        train(cfg, tmp_path, batches=SyntheticBatches(cfg.data, cfg.model_config()), eval_batches=lambda: eval_batches)
    assert eval_batches.closed


_FAILING_EVAL = """
import sys
from t5gemma2_jax.train import step

def broken(state, batch):
    raise RuntimeError("injected eval fault")

build = step.CompiledSteps.__init__
def patched(self, *a, **kw):
    build(self, *a, **kw)
    self.eval = broken
step.CompiledSteps.__init__ = patched

if __name__ == "__main__":          # Grain's worker processes import this module too
    from t5gemma2_jax import cli
    from t5gemma2_jax.train import load_config, train
    cfg = load_config(sys.argv[1], sys.argv[3:])
    sys.exit(cli.run(lambda: train(cfg, sys.argv[2])))
"""


def test_a_run_whose_eval_fails_with_data_workers_prints_one_traceback(tmp_path):
    """Data from files through Grain worker processes, an eval step that raises at step 0: exit 1
    with the one traceback of the error, none from the workers or the pipeline's teardown."""
    from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path

    data = tmp_path / "text.jsonl"
    data.write_text("".join(f'{{"text": "The river {i} flows slowly through the town, and the weather is sunny."}}\n'
                            for i in range(200)))
    driver = tmp_path / "driver.py"
    driver.write_text(_FAILING_EVAL)
    overrides = [*SMALL_TINY, "data.batch_size=2", f"data.train={data}", f"data.eval={data}",
                 f"data.tokenizer={tiny_tokenizer_path()}", "data.num_workers=2", "train.steps=2",
                 "train.eval_at_start=true", "train.progress_bar=false"]
    env = script_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(driver), str(ROOT / "configs" / "tiny.yaml"), str(tmp_path / "run"),
                           *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-5000:]
    assert proc.stderr.rstrip().endswith("RuntimeError: injected eval fault"), proc.stderr[-3000:]

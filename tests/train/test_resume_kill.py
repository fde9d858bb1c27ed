"""kill -9 in the middle of a run, rerun the same command: training resumes from the last complete
checkpoint and every loss equals an uninterrupted run's, bitwise (CPU, 8 fake devices, the real
Grain data pipeline on the demo dataset)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t5gemma2_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16
OVERRIDES = [
    "model.encoder.num_layers=2", "model.decoder.num_layers=2", "model.scan_layers=false",
    "model.encoder.layer_types=[sliding_attention,full_attention]",
    "model.decoder.layer_types=[sliding_attention,full_attention]",
    "data.max_images_per_row=0", "data.encoder_length=64", "data.decoder_length=32",
    f"train.steps={STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.log_every=1",
    "train.eval_every=0", "train.progress_bar=false", "train.export_at_end=false", "optim.warmup_steps=2",
]


def _command(workdir: Path, cache: Path, extra=()) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--workdir", str(workdir), *OVERRIDES, *extra, f"train.compilation_cache_dir={cache}"]


def _env():
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return env


def _losses(workdir: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
@pytest.mark.heavy   # CI's slow tier kills runs at five moments in tests/train/test_gcs_runs.py
@pytest.mark.parametrize("extra", [(), ("lora.rank=4", "optim.learning_rate=1e-2")], ids=["full", "lora"])
def test_kill9_then_rerun_resumes_bitwise(tmp_path, extra):
    """With adapters the checkpoint holds only them: the resumed run rebuilds the frozen base and
    must still continue bit for bit."""
    cache = tmp_path / "xla_cache"
    ref = subprocess.run(_command(tmp_path / "ref", cache, extra), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # train.compilation_cache_dir (here, unlike the other subprocess tests, which share the session's
    # cache through the environment): the run's programs are written there for the reruns.
    assert any(cache.iterdir()), "train.compilation_cache_dir stayed empty"
    expected = _losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, STEPS + 1))

    work = tmp_path / "run"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_command(work, cache, extra), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    first = work / "checkpoints" / "2"  # appears (renamed from a temporary name) once complete
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]

    from t5gemma2_jax.train.checkpoint import Checkpointer
    last = Checkpointer(work / "checkpoints", every=2).latest_step()
    assert last is not None and 2 <= last < STEPS, f"kill came too late (last checkpoint {last})"

    again = subprocess.run(_command(work, cache, extra), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {last}" in again.stderr  # "resumed from ... at step N"
    got = _losses(work)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bitwise: floats round-trip exactly through JSON

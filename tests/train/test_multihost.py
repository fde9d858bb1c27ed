"""Two processes x 4 CPU devices (jax.distributed over localhost, gloo collectives): global
batches from process-local rows, per-process data state in checkpoints, resume. Slow (two
processes compile concurrently), so not in the default run: pytest -m slow tests/train."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from t5gemma2_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "model.encoder.num_layers=2", "model.decoder.num_layers=2", "model.scan_layers=false",
    "data.max_images_per_row=0", "data.encoder_length=64", "data.decoder_length=32",
    "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=2", "train.eval_steps=2",
    "train.progress_bar=false", "train.export_at_end=true", "optim.warmup_steps=2", "mesh.fsdp=4",
    "mesh.data=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(workdir: Path, cache: Path, steps: int, extra=()) -> None:
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--workdir", str(workdir), *OVERRIDES, *extra, f"train.steps={steps}",
               f"train.compilation_cache_dir={cache}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    work, cache = tmp_path / "run", tmp_path / "cache"
    _run_two(work, cache, steps=4)
    ck = work / "checkpoints" / "4" / "data"
    states = {p.name: json.loads(p.read_text()) for p in ck.glob("process_*.json")}
    assert set(states) == {"process_0-of-2.json", "process_1-of-2.json"}
    assert all(s["split"] == "train" for s in states.values())  # (positions: equal on both hosts)
    _run_two(work, cache, steps=6)
    rows = read_metrics(work)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    assert (work / "export" / "model_config.json").exists()


@pytest.mark.slow
def test_two_processes_train_lora_adapters(tmp_path):
    """Adapters sharded over both processes: checkpoints without the base, resume against the
    base's checksums on every host, one PEFT directory gathered from all shards at the end."""
    import numpy as np
    from safetensors.numpy import load_file

    work, cache = tmp_path / "run", tmp_path / "cache"
    lora = ["lora.rank=4", "optim.learning_rate=1e-2"]
    _run_two(work, cache, steps=4, extra=lora)
    _run_two(work, cache, steps=6, extra=lora)
    assert [r["step"] for r in read_metrics(work) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    tensors = load_file(work / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 4 and all(np.isfinite(t).all() for t in tensors.values())
    assert any(np.abs(t).max() > 0 for k, t in tensors.items() if "lora_B" in k)   # B trained
    assert not (work / "export").exists()

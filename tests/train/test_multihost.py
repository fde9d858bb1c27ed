"""Two processes x 4 CPU devices (jax.distributed over localhost, gloo collectives): global
batches from process-local rows, per-process data state in checkpoints, resume, on a local work
directory and on a `gs://` one (a real GCS JSON API on 127.0.0.1, `tests/gcs_emulator.py`). Slow
(two processes compile concurrently), so not in the default run: pytest -m slow tests/train."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xla_env import xla_flags
from t5gemma2_jax import storage
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


def _workdir(where: str, tmp_path: Path, request, name: str = "run"):
    """A fresh work directory: under `tmp_path`, or in a new bucket of the session's emulator."""
    if where == "local":
        return tmp_path / name
    return storage.as_path(f"{request.getfixturevalue('bucket')}/{name}")


def _start_two(workdir, steps: int, extra=()) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   XLA_FLAGS=xla_flags(4))
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--workdir", str(workdir), *OVERRIDES, *extra, f"train.steps={steps}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _run_two(workdir, steps: int, extra=()) -> list[str]:
    procs = _start_two(workdir, steps, extra)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("where", [pytest.param("local", marks=pytest.mark.heavy), "gs"])
def test_two_processes_train_checkpoint_and_resume(tmp_path, request, where):
    work = _workdir(where, tmp_path, request)
    _run_two(work, steps=4)
    ck = work / "checkpoints" / "4" / "data"
    states = {p.name: json.loads(p.read_text()) for p in ck.glob("process_*.json")}
    assert set(states) == {"process_0-of-2.json", "process_1-of-2.json"}
    assert all(s["split"] == "train" for s in states.values())  # (positions: equal on both hosts)
    outs = _run_two(work, steps=6)
    assert " [p0] INFO " in outs[0] and " INFO " not in outs[1]   # INFO from process 0 only
    rows = read_metrics(work)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    assert (work / "export" / "model_config.json").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_train_lora_adapters(tmp_path):
    """Adapters sharded over both processes: checkpoints without the base, resume against the
    base's checksums on every host, one PEFT directory gathered from all shards at the end."""
    import numpy as np
    from safetensors.numpy import load_file

    work = tmp_path / "run"
    lora = ["lora.rank=4", "optim.learning_rate=1e-2"]
    _run_two(work, steps=4, extra=lora)
    _run_two(work, steps=6, extra=lora)
    assert [r["step"] for r in read_metrics(work) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    tensors = load_file(work / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 4 and all(np.isfinite(t).all() for t in tensors.values())
    assert any(np.abs(t).max() > 0 for k, t in tensors.items() if "lora_B" in k)   # B trained
    assert not (work / "export").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_is_bitwise_equal(tmp_path, bucket):
    """Logging only at the first and last steps, so that what stops the other host is JAX's
    preemption sync point, checked every step, not the flags shared at logging steps. The work
    directories are in a bucket, as on a pod (the test above runs both kinds)."""
    import jax
    import numpy as np

    from t5gemma2_jax.checkpoints.export import flat_params, load_export
    from t5gemma2_jax.train.checkpoint import Checkpointer

    steps = 60
    extra = ["train.log_every=1000", "train.checkpoint_every=4", "train.eval_every=0", "train.keep_checkpoints=2"]
    ref, work = storage.as_path(f"{bucket}/ref"), storage.as_path(f"{bucket}/run")
    _run_two(ref, steps, extra)

    procs = _start_two(work, steps, extra)
    deadline = time.time() + 600
    while not (work / "checkpoints" / "4").exists() and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:] + outs[1][-3000:]
    stopped = [re.search(r"stopped at step (\d+) on (\w+)", out) for out in outs]
    assert all(stopped), outs[0][-2000:] + outs[1][-2000:]
    assert stopped[1].group(2) == "SIGTERM" and stopped[0].group(2) == "preemption"
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step and 4 < step < steps
    assert Checkpointer(work / "checkpoints", every=4).latest_step() == step
    # Each host's log lines name it; the one that got the signal says so, the other one says why it stops.
    assert re.search(r"\[p1\] WARNING t5gemma2_jax.train.preemption: SIGTERM: saving a checkpoint", outs[1])
    assert re.search(r"\[p0\] WARNING t5gemma2_jax.train.preemption: preemption notice .*step " + str(step), outs[0])
    assert " INFO " not in outs[1] and " [p0] INFO " in outs[0]
    assert not (work / "export").exists()

    _run_two(work, steps, extra)
    want_rows, got = read_metrics(ref), read_metrics(work)
    assert [r["loss"] for r in got if r["step"] == steps] == [r["loss"] for r in want_rows if r["step"] == steps]
    want, have = (jax.device_get(flat_params(load_export(d / "export"))) for d in (ref, work))
    assert sorted(have) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(have[name], want[name], err_msg=name)


"""Experiment tracking: the git state of the checkout, and Weights & Biases logging in offline
mode (read back from the run file wandb writes), through `MetricsWriter` and through a tiny run."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.experiment import load_config
from t5gemma2_jax.train.metrics import MetricsWriter
from t5gemma2_jax.train.tracking import WandbConfig, WandbRun, git_state


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(directory: Path) -> list:
    """The records of the one offline run under `directory`: wandb's run file is a LevelDB-style
    log (32 KiB blocks of checksum, length, type, payload) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):       # the padding at the end of a block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk      # full / first, or middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def history(records) -> dict[int, dict]:
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            # a key with "/" is stored split (nested_key), as are a table's fields
            rows[r.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                        for i in r.history.item}
    return rows


def run_config(records) -> dict:
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return {i.key: json.loads(i.value_json) for i in run.config.update}


def test_git_state_names_the_checkout_commit(tmp_path):
    here = Path(__file__).resolve().parent
    want = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    state = git_state(here)
    assert state["commit"] == want and len(want) == 40 and isinstance(state["dirty"], bool)
    assert git_state(tmp_path) is None                      # not a checkout


def test_metrics_writer_logs_to_wandb_what_tensorboard_gets(tmp_path):
    run = WandbRun(WandbConfig(enabled=True, project="tests", name="writer", mode="offline"), tmp_path,
                   {"train": {"steps": 3}, "git": {"commit": "abc"}})
    writer = MetricsWriter(tmp_path, tensorboard=False, tracker=run)
    writer.write(1, {"loss": 2.5, "records_seen": 8, "eval_loss": 3.0, "stopped": True, "note": "x"})
    writer.write(2, {"loss": 2.0})
    writer.write_text(2, "eval_samples", [{"prompt": "p", "prediction": "q"}])
    writer.close()
    records = wandb_records(tmp_path)
    rows = history(records)
    assert rows[1]["train/loss"] == 2.5 and rows[1]["data/records_seen"] == 8 and rows[1]["eval/loss"] == 3.0
    assert "train/stopped" not in rows[1] and "train/note" not in rows[1]     # numbers only, as TensorBoard
    assert rows[2]["train/loss"] == 2.0 and rows[2]["eval_samples/_type"] == "table-file"
    assert run_config(records)["git"] == {"commit": "abc"}
    assert (tmp_path / "wandb_run_id").read_text().strip() == run.run.id


def test_tensorboard_event_files_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it can (seconds at every run's start); the writer keeps it
    out, and torch still imports afterwards."""
    import sys

    code = ("import sys\n"
            "from t5gemma2_jax.train.metrics import MetricsWriter\n"
            f"w = MetricsWriter({str(tmp_path)!r})\n"
            "assert w.tb is not None\n"
            "w.write(1, {'loss': 2.5})\nw.close()\n"
            "assert 'torch' not in sys.modules\n"
            "import torch\nprint(torch.ones(2).sum().item())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert b"train/loss" in events.read_bytes()


def test_wandb_config_is_validated_and_off_by_default():
    assert not load_config(None).train.wandb.enabled
    cfg = load_config(None, ["train.wandb.enabled=true", "train.wandb.mode=offline", "train.wandb.tags=[a, b]"])
    assert cfg.train.wandb == WandbConfig(enabled=True, mode="offline", tags=("a", "b"))
    with pytest.raises(ConfigError, match=r"train.wandb.mode: 'cloud' not in"):
        load_config(None, ["train.wandb.mode=cloud"])
    with pytest.raises(ConfigError, match=r"train.wandb.projet: unknown key \(did you mean 'train.wandb.project'"):
        load_config(None, ["train.wandb.projet=x"])


@pytest.mark.slow            # trains a tiny run (about a minute on a loaded 2-core CPU)
def test_a_run_logs_to_wandb_and_records_its_commit(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import small_config

    from t5gemma2_jax.train import train
    from t5gemma2_jax.checkpoints.run import read_run_meta

    cfg = small_config(train={"steps": 4, "log_every": 2, "wandb": {"enabled": True, "mode": "offline",
                                                                      "project": "tests", "group": "g"}})
    train(cfg, tmp_path)
    records = wandb_records(tmp_path)
    rows = history(records)
    assert sorted(rows) == [1, 2, 4] and all("train/loss" in rows[s] for s in rows)
    logged = run_config(records)
    assert logged["git"] == git_state() and logged["train"]["steps"] == 4 and logged["train"]["wandb"]["group"] == "g"
    meta = read_run_meta(tmp_path / "checkpoints" / "4")
    assert meta["git"] == git_state() and meta["git"]["commit"]

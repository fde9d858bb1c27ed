"""`train.profile_steps`: a jax.profiler trace of the chosen steps in the run's TensorBoard
directory, traced locally and copied when the work directory is a URL."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from t5gemma2_jax import storage
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.experiment import load_config
from t5gemma2_jax.train import profile
from t5gemma2_jax.train.profile import StepProfiler, copy_tree

ROOT = Path(__file__).resolve().parents[2]


@jax.jit
def _step(x):
    return jnp.tanh(x @ x.T).sum()


def _steps(profiler: StepProfiler, n: int) -> None:
    x = jnp.ones((32, 32))
    for step in range(1, n + 1):
        with profiler.trace(step):
            out = _step(x)
        profiler.after(step, out)


def _traces(directory: Path) -> list[Path]:
    return sorted(directory.glob("tensorboard/plugins/profile/*/*.xplane.pb"))


def test_profile_steps_write_a_trace_into_the_tensorboard_directory(tmp_path):
    with StepProfiler((2, 3), tmp_path) as p:
        _steps(p, 2)
        assert p._local is not None                 # still tracing: step 3 is in the window
        _steps(p, 4)
    assert len(_traces(tmp_path)) == 1 and _traces(tmp_path)[0].stat().st_size > 0
    with StepProfiler((2, 3), tmp_path / "other", enabled=False) as p:     # process > 0
        _steps(p, 4)
    assert not (tmp_path / "other").exists()


def test_a_run_stopping_inside_the_window_still_ends_the_trace(tmp_path):
    with StepProfiler((1, 10), tmp_path / "a") as p:
        _steps(p, 2)
    assert len(_traces(tmp_path / "a")) == 1
    with StepProfiler((1, 1), tmp_path / "b") as p:        # a second trace can start: the first ended
        _steps(p, 1)
    assert len(_traces(tmp_path / "b")) == 1


def test_a_url_workdir_is_traced_locally_then_copied(bucket, monkeypatch):
    """Into a bucket of a real GCS JSON API on 127.0.0.1 (the profiler's own writer would look up
    the real endpoint): the trace is taken locally, copied, and the local copy removed."""
    seen = []

    def record(local, dest):
        seen.append(Path(local))
        return copy_tree(local, dest)

    monkeypatch.setattr(profile, "copy_tree", record)
    with StepProfiler((1, 2), f"{bucket}/run") as p:
        _steps(p, 3)
    (local,) = seen
    assert not local.exists()                                   # the temporary directory is removed
    traces = storage.glob(f"{bucket}/run/tensorboard/plugins/profile/*/*.xplane.pb")
    assert len(traces) == 1 and len(storage.read_bytes(traces[0])) > 0


def test_copy_tree_keeps_relative_paths_and_bytes(tmp_path):
    src = tmp_path / "src"
    (src / "plugins" / "profile" / "run1").mkdir(parents=True)
    (src / "plugins" / "profile" / "run1" / "host.xplane.pb").write_bytes(b"\x00\x01trace")
    (src / "top.txt").write_text("x")
    out = copy_tree(src, tmp_path / "dst")
    assert out == [str(tmp_path / "dst" / "plugins/profile/run1/host.xplane.pb"), str(tmp_path / "dst" / "top.txt")]
    assert (tmp_path / "dst" / "plugins/profile/run1/host.xplane.pb").read_bytes() == b"\x00\x01trace"


@pytest.mark.parametrize("value, message", [
    ("[3,2]", "train.profile_steps: must be [first, last] with 1 <= first <= last"),
    ("[0,2]", "train.profile_steps: must be [first, last] with 1 <= first <= last"),
    ("[5]", "train.profile_steps: must be [first, last]"),
    ("[2000,2001]", "train.profile_steps: [2000, 2001] starts after the last step (train.steps=20)"),
    ("7", "train.profile_steps: expected a list"),
])
def test_bad_profile_steps_are_one_config_error_naming_the_key(value, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(ROOT / "configs" / "tiny.yaml", [f"train.profile_steps={value}", "train.steps=20"])

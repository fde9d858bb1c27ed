"""scripts/hugepages.py: the command lines restart themselves under glibc's huge-page tunable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scripts_loader import SCRIPTS, load_script

hugepages = load_script("hugepages")
GLIBC = hugepages.environment(environ={}) is not None


@pytest.mark.skipif(not GLIBC, reason="glibc >= 2.35 on Linux only")
def test_the_tunable_is_added_kept_or_turned_off():
    env = hugepages.environment
    assert env(environ={"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert env(environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # A value the user set stands; already on, nothing to do.
    assert env(environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert env(environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    # Off (the benchmark's side-by-side run) replaces any value.
    assert env(False, environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}) == \
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
    assert env(False, environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


def test_nothing_changes_off_linux(monkeypatch):
    monkeypatch.setattr(hugepages.platform, "system", lambda: "Darwin")
    assert hugepages.environment(environ={}) is None
    monkeypatch.setattr(hugepages.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert hugepages.environment(environ={}) is None


def _tree(root, *paths, pci=None):
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).touch()
    if pci:
        d = root / "sys/bus/pci/devices/0000:00:04.0"
        d.mkdir(parents=True)
        (d / "vendor").write_text(pci[0] + "\n")
        (d / "device").write_text(pci[1] + "\n")
    return str(root)


def test_accelerators_are_found_as_jax_finds_them(tmp_path):
    find = hugepages.accelerator
    assert find({}, _tree(tmp_path / "cpu", "dev/null", "dev/vfio/vfio", pci=("0x1ae0", "0x0042"))) is None  # gVNIC
    assert find({}, _tree(tmp_path / "v4", "dev/accel0")) == "tpu"
    assert find({}, _tree(tmp_path / "v6e", "dev/vfio/0", "dev/vfio/vfio")) == "tpu"
    assert find({}, _tree(tmp_path / "pci", pci=("0x1ae0", "0x0063"))) == "tpu"
    assert find({}, _tree(tmp_path / "h100", "dev/nvidiactl", "dev/nvidia0")) == "gpu"
    # JAX_PLATFORMS decides when set, whatever the devices.
    assert find({"JAX_PLATFORMS": "cpu"}, str(tmp_path / "v4")) is None
    assert find({"JAX_PLATFORMS": "cuda,cpu"}, str(tmp_path / "cpu")) == "cuda"


@pytest.mark.skipif(not GLIBC, reason="glibc >= 2.35 on Linux only")
def test_a_pod_or_gpu_run_starts_as_launched(tmp_path):
    """The pod entry point never re-executes itself on an accelerator host (the tunable is CPU tuning)."""
    assert hugepages.environment(environ={}, root=_tree(tmp_path / "tpu", "dev/vfio/0")) is None
    assert hugepages.environment(environ={}, root=_tree(tmp_path / "gpu", "dev/nvidiactl")) is None
    assert hugepages.environment(environ={"JAX_PLATFORMS": "tpu"}, root=str(tmp_path)) is None
    # Turning it off (the benchmark's side-by-side run) is still honoured.
    assert hugepages.environment(False, environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
                                 root=str(tmp_path / "tpu"))["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


@pytest.mark.skipif(not GLIBC, reason="glibc >= 2.35 on Linux only")
def test_a_script_restarts_itself_once_with_the_same_pid_and_arguments(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "import hugepages\n"
        "print('start', os.getpid(), flush=True)\n"
        "hugepages.restart_with_huge_pages()\n"
        "print('run', os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:], flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
    out = subprocess.run([sys.executable, "-u", str(script), "a", "b c"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    pid = out[0].split()[1]
    assert out == [f"start {pid}", f"start {pid}",
                   f"run {pid} glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['a', 'b c']"]


def test_every_script_that_runs_a_model_starts_with_the_restart():
    for name in ("train", "generate", "evaluate", "demo", "adapt_gemma3", "benchmark", "benchmark_calls",
                 "benchmark_decode", "benchmark_attention"):
        text = (SCRIPTS / f"{name}.py").read_text()
        restart = text.find("hugepages.restart_with_huge_pages(")
        heavy = min(i for i in (text.find("\nimport jax"), text.find("\nimport t5gemma2_jax"),
                                text.find("\nfrom t5gemma2_jax"), len(text)) if i >= 0)
        assert 0 <= restart < heavy, f"{name}.py imports JAX or the package before it restarts"

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

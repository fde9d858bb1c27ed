"""Start the command lines with glibc's transparent-huge-page tunable (Linux, glibc >= 2.35).

XLA:CPU allocates each program's temporary buffers afresh on every call, and glibc serves large
blocks with a fresh `mmap`, so with 4 KiB pages the kernel faults in every page of them again each
call: about 4.7 GiB a step for a 270m-270m train step, a large share of its backward's time on a
CPU. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc asks for transparent huge pages
(`madvise`), which fault in 2 MiB at a time (`scripts/benchmark.py --no-hugepages` measures the
difference; docs/benchmarks.md has the numbers). The tunable is read only when a process starts, so
a script that runs without it replaces itself (`execve`, same pid, same arguments and
environment) with a copy that has it. Set `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to keep the
kernel's default pages; any `glibc.malloc.hugetlb` value already set is left as it is. A no-op
off Linux/glibc and for processes embedded in others (tests call `main(argv)` directly), and on a
host with a TPU or GPU: there the step runs on the accelerator, whose memory glibc does not serve,
so a pod's or cluster's run starts as it was launched (`accelerator`).

This lives beside the scripts rather than in the package because it must run before the package
(and JAX) is imported, or the process would pay that import twice.
"""

from __future__ import annotations

import os
import platform
import runpy
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"


def _glibc_reads_it() -> bool:
    if platform.system() != "Linux":
        return False
    libc, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return libc == "glibc" and (major, minor) >= (2, 35)


def accelerator(environ=os.environ, root: str = "/") -> str | None:
    """The accelerator JAX would run on here, or None for a CPU-only host: the package's own
    `hardware.accelerator`, run from the checkout by path because this runs before the package
    (and JAX) may be imported."""
    hardware = runpy.run_path(str(Path(__file__).resolve().parents[1] / "t5gemma2_jax" / "hardware.py"))
    return hardware["accelerator"](environ, root)


def environment(on: bool = True, environ=os.environ, root: str = "/") -> dict[str, str] | None:
    """The environment to restart with: `environ` with the tunable set to 1 (`on`, unless a
    value is there already: the user's choice stands) or to 0 (`on=False`, replacing any value),
    the other tunables kept; None where nothing would change, glibc would not read it, or (`on`)
    the host has an accelerator."""
    items = [t.partition("=") for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    current = next((value for name, _, value in items if name == TUNABLE), None)
    if not _glibc_reads_it() or (current is not None if on else current == "0"):
        return None
    if on and accelerator(environ, root) is not None:
        return None
    kept = ["".join(item) for item in items if item[0] != TUNABLE]
    return {**environ, "GLIBC_TUNABLES": ":".join(kept + [f"{TUNABLE}={int(on)}"])}


def restart_with_huge_pages(on: bool = True) -> None:
    """Replace this process with the same command line under the tunable (`environment(on)`), or
    return where nothing would change. Call it first thing in a script's `__main__` block."""
    env = environment(on)
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv is the interpreter's own command line (its flags, `-m`, the script as given); its
    # first word becomes the absolute interpreter, so a virtual environment's stays in use.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

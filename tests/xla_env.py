"""How the test processes, and the scripts they start, compile.

The tests' programs are tiny and most of them run a few times, so compiling is most of a test's
time. XLA's HLO passes run as they do for users (the optimised HLO is the same, but for lone
elementwise ops, which the newer emitters want wrapped in fusions); the CPU machine code is made
cheaply: LLVM's optimisation passes are skipped (JAX's
`jax_disable_most_optimizations`) and fusions go through XLA's elemental emitters instead of its
newer fusion emitters. Together they take about half of the compile time away and make the code
run at about half the speed (docs/testing.md has the numbers), so the runs whose time is spent
running, not compiling (the demo, the notebook, the 270M fine-tune), start with `user_env` instead.
"""

from __future__ import annotations

import os

FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process: `devices` fake CPU devices (JAX's default, one, if None)."""
    count = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
    return " ".join([*count, *FAST_COMPILE_FLAGS])


def set_defaults() -> None:
    """This process's defaults (tests/conftest.py, before JAX is imported): 8 devices, cheap code
    generation. Variables already set are kept; JAX_DISABLE_MOST_OPTIMIZATIONS=0 restores XLA's
    default code generation (with XLA_FLAGS set to anything without the flags above)."""
    os.environ.setdefault("XLA_FLAGS", xla_flags(8))
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def script_env(devices: int | None = None, base: dict | None = None) -> dict[str, str]:
    """The environment of a script a test starts, with `devices` fake CPU devices and cheap code
    generation (the compilation cache's variables come along with os.environ)."""
    env = dict(os.environ if base is None else base)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    return env


def user_env(base: dict | None = None) -> dict[str, str]:
    """The environment of a user's CPU run: one device and XLA's default code generation."""
    env = dict(os.environ if base is None else base)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    return env

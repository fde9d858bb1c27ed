"""Which machine a run is on, decided before any backend starts: TPU detection on fake device trees
(`t5gemma2_jax.hardware`), the signal that makes `train.distributed=auto` start `jax.distributed`
on fake environments (`parallel.distributed_signal`), and the scripts' per-process logging."""

from __future__ import annotations

import logging

import pytest

from t5gemma2_jax.cli import ProcessLogFilter
from t5gemma2_jax.hardware import tpu_attached, tpu_evidence, tpu_pci_chips
from t5gemma2_jax.parallel import distributed_signal


def pci(root, slot: str, vendor: str, device: str) -> None:
    d = root / "sys" / "bus" / "pci" / "devices" / slot
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def dev(root, *names: str) -> None:
    for name in names:
        p = root / "dev" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")


def test_an_empty_tree_and_this_machine_have_no_tpu(tmp_path):
    assert tpu_evidence(tmp_path) is None and tpu_pci_chips(tmp_path) == []
    assert tpu_evidence(tmp_path / "missing") is None


def test_google_pci_devices_that_are_not_tpus_do_not_count(tmp_path):
    pci(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")     # gVNIC, on most GCE VMs (GPU VMs included)
    pci(tmp_path, "0000:00:05.0", "0x1ae0", "0x001f")     # a local SSD
    pci(tmp_path, "0000:00:06.0", "0x10de", "0x2330")     # an NVIDIA H100
    dev(tmp_path, "vfio/vfio", "nvidia0")                  # VFIO loaded, no group bound
    assert tpu_evidence(tmp_path) is None and not tpu_attached(tmp_path)


@pytest.mark.parametrize("device, generation", [("0x0063", "v5e"), ("0x006f", "v6e"), ("0x0062", "v5p"),
                                                ("0x005e", "v4")])
def test_tpu_chips_on_the_pci_bus(tmp_path, device, generation):
    for i in range(4):
        pci(tmp_path, f"0000:00:0{4 + i}.0", "0x1ae0", device)
    pci(tmp_path, "0000:00:0a.0", "0x1ae0", "0x0042")
    assert tpu_pci_chips(tmp_path) == [generation] * 4
    assert tpu_evidence(tmp_path) == f"4 TPU {generation} chip(s) on the PCI bus (vendor 0x1ae0)"


def test_accel_and_vfio_device_files(tmp_path):
    dev(tmp_path, "accel0", "accel1", "accel2", "accel3")              # TPU v4 VM
    assert tpu_evidence(tmp_path) == "TPU device files /dev/accel0 (4 in all)"
    other = tmp_path / "colab"
    dev(other, "vfio/vfio", "vfio/0")                                   # a Colab v5e-1 runtime
    assert tpu_evidence(other) == "VFIO device groups /dev/vfio/0 (1 in all)"


@pytest.mark.parametrize("env, expect", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1", "JAX_NUM_PROCESSES": "1"}, None),
    ({"SLURM_NTASKS": "x"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1,t1k-2,t1k-3"}, "TPU cluster variable TPU_WORKER_HOSTNAMES"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "TPU cluster variable TPU_WORKER_HOSTNAMES"),   # GKE, one host
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "TPU cluster variable MEGASCALE_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_NUM_PROCESSES": "4"}, "JAX_NUM_PROCESSES > 1"),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, "Slurm job (SLURM_NTASKS > 1)"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI job (OMPI_COMM_WORLD_SIZE > 1)"),
])
def test_distributed_signal_from_the_environment(tmp_path, env, expect):
    assert distributed_signal(env, tmp_path, platforms="") == expect


def test_a_tpu_vm_starts_jax_distributed_with_nothing_in_its_environment(tmp_path):
    """`gcloud compute tpus tpu-vm ssh --worker=all` sets no variable: the device tree decides,
    before the environment's other signals, unless jax_platforms leaves the TPU out."""
    pci(tmp_path, "0000:00:04.0", "0x1ae0", "0x0063")
    assert distributed_signal({}, tmp_path, platforms="") == "TPU: 1 TPU v5e chip(s) on the PCI bus (vendor 0x1ae0)"
    assert distributed_signal({}, tmp_path, platforms="tpu,cpu").startswith("TPU: ")
    assert distributed_signal({"SLURM_NTASKS": "2"}, tmp_path, platforms="").startswith("TPU: ")
    assert distributed_signal({}, tmp_path, platforms="cpu") is None
    assert distributed_signal({"TPU_WORKER_HOSTNAMES": "a,b"}, tmp_path, platforms="cuda") is None
    assert distributed_signal({"JAX_COORDINATOR_ADDRESS": "h:1"}, tmp_path, platforms="cpu") == "JAX_COORDINATOR_ADDRESS"


def _records(index: int | None) -> list[str]:
    filt, out = ProcessLogFilter(), []
    filt.index = index

    class Collect(logging.Handler):
        def emit(self, record):
            out.append(self.format(record))

    handler = Collect()
    handler.addFilter(filt)
    handler.setFormatter(logging.Formatter("[%(process_tag)s] %(levelname)s %(message)s"))
    logger = logging.getLogger(f"t5gemma2_jax.test_hosts.{index}")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(handler)
    try:
        logger.info("compiled")
        logger.warning("slow disk")
        logger.error("failed")
    finally:
        logger.removeHandler(handler)
    return out


def test_logs_info_from_process_0_only_each_line_naming_its_process():
    assert _records(0) == ["[p0] INFO compiled", "[p0] WARNING slow disk", "[p0] ERROR failed"]
    assert _records(3) == ["[p3] WARNING slow disk", "[p3] ERROR failed"]
    assert _records(None) == ["[p?] INFO compiled", "[p?] WARNING slow disk", "[p?] ERROR failed"]


def test_the_scripts_logging_replaces_the_handler_absl_installs_on_import():
    """Importing orbax logs through absl, whose first call runs logging.basicConfig(): the scripts'
    format must still be the one every line gets."""
    import os
    import subprocess
    import sys

    code = ("import logging\nfrom t5gemma2_jax import cli\ncli.configure_logging()\n"
            "logging.getLogger('t5gemma2_jax.x').info('before')\ncli.start_processes('off')\n"
            "logging.getLogger('t5gemma2_jax.x').info('after')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stderr
    lines = [ln[9:] for ln in err.splitlines() if "t5gemma2_jax.x" in ln]
    assert lines == ["[p?] INFO t5gemma2_jax.x: before", "[p0] INFO t5gemma2_jax.x: after"], err[-2000:]


def test_a_background_threads_connection_failure_is_one_line_and_other_tracebacks_stay():
    """Orbax's save threads log the exception they hand to the main thread; when the store stops
    answering, the main thread's one-line error says it, so their report keeps its line only."""
    import io
    import threading

    from t5gemma2_jax.cli import UnreachableStoreFilter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(UnreachableStoreFilter())
    logger = logging.getLogger("test_hosts.threads")
    logger.addHandler(handler)
    logger.propagate = False

    def report(error: BaseException) -> None:
        try:
            raise error
        except BaseException:
            logger.exception("save raised: %s", error)

    def wrapped() -> RuntimeError:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
        except OSError as e:
            try:
                raise RuntimeError("Cannot connect to host 127.0.0.1:1") from e
            except RuntimeError as r:
                return r

    try:
        for error in (wrapped(), ValueError("a bug")):
            t = threading.Thread(target=report, args=(error,))
            t.start()
            t.join()
        report(wrapped())                                  # the main thread's own report keeps its traceback
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert text.startswith("save raised: Cannot connect to host 127.0.0.1:1\nsave raised: a bug\nTraceback"), text
    assert text.count("Traceback") == 3 and "ValueError: a bug" in text, text   # the bug's, and the main thread's chain


def test_an_allocation_the_device_cannot_make_is_one_line_and_other_runtime_errors_keep_their_traceback(capsys):
    import jax
    import jax.numpy as jnp

    from t5gemma2_jax import cli

    # A real allocation of 1 TiB on this machine's CPU device, as a too-large batch would ask for.
    assert cli.run(lambda: jnp.ones((2**38,), jnp.float32).block_until_ready()) == cli.USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: the device ran out of memory (RESOURCE_EXHAUSTED: ") and err.count("\n") == 1, err
    assert "lower the batch size" in err

    def internal():
        raise jax.errors.JaxRuntimeError("INTERNAL: a compiler bug")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        cli.run(internal)

"""Preemption: the SIGTERM handler chains to the one before it (JAX's notifier included, which
JAX installs from C++), Ctrl-C, and a single TPU-like host in a 1-process `jax.distributed` cluster.
The two-host case (SIGTERM to one process stops both at one step) is in test_multihost.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from xla_env import script_env
from t5gemma2_jax.train.preemption import PreemptionGuard, sync_point_available


def test_sigterm_chains_to_the_handler_before_it_and_puts_it_back():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        mine = signal.getsignal(signal.SIGTERM)
        with PreemptionGuard() as guard:
            assert not guard.should_stop(1, sync=False)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested == "SIGTERM" and seen == [signal.SIGTERM]
            assert guard.should_stop(2, sync=False)          # one process: after this step
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_asks_to_stop_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested == "SIGINT" and guard.should_stop(1, sync=True)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert not sync_point_available()        # this process never started jax.distributed


PROBE = textwrap.dedent("""
    import json, logging, os, signal, sys, time
    logging.basicConfig(level=logging.WARNING)
    root, port, ckpt = sys.argv[1:4]
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from t5gemma2_jax.parallel import SetupError, maybe_initialize_distributed
    from t5gemma2_jax.train.preemption import PreemptionGuard, _sigaction, multihost_reached

    out = {"alone": maybe_initialize_distributed("auto", root=root)}
    try:
        maybe_initialize_distributed("on", root=root)
    except SetupError as e:
        out["on"] = str(e)
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")
    out["started"] = maybe_initialize_distributed("auto", root=root)
    out["processes"], out["devices"] = jax.process_count(), jax.device_count()

    jaxs_handler = _sigaction(signal.SIGTERM).handler
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        out["requested"], out["stop"] = guard.requested, guard.should_stop(1, sync=False)
        out["sync_step"] = next((s for s in range(2, 400) if multihost_reached(s) or time.sleep(0.02)), None)
    out["restored"] = _sigaction(signal.SIGTERM).handler == jaxs_handler

    # Orbax's asynchronous save, which needs the distributed client on a pod, works in the cluster.
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    x = jax.device_put(np.arange(16.0), jax.NamedSharding(mesh, jax.P("d")))
    with ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True)) as m:
        m.save(1, args=ocp.args.StandardSave({"x": x}))
        m.wait_until_finished()
        out["saved"] = m.latest_step()
    print("RESULT " + json.dumps(out))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tpu_like_host_in_a_one_process_cluster(tmp_path):
    """What a CPU machine cannot have is stood in for: the TPU's PCI function (a fake /sys tree) and
    the TPU metadata JAX reads the cluster from (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=1 and
    JAX_PROCESS_ID=0 for a 1-process cluster on 127.0.0.1). Everything else is real: the start-up
    decision, jax.distributed, JAX's C++ SIGTERM notifier, our handler chaining to it, Orbax."""
    root = tmp_path / "root"
    d = root / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text("0x1ae0\n")
    (d / "device").write_text("0x0063\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "SLURM_", "OMPI_"))}
    env = script_env(2, env)       # no JAX_PLATFORMS: it would rule the TPU out
    proc = subprocess.run([sys.executable, "-c", PROBE, str(root), str(_free_port()), str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # No cluster around the TPU (no metadata here): one process, and a warning saying so.
    assert out["alone"] is None and "JAX found no TPU cluster" in proc.stderr
    assert out["on"].startswith("train.distributed=on (train.distributed=on): jax.distributed.initialize() "
                                "found no cluster")
    assert out["started"] == "TPU: 1 TPU v5e chip(s) on the PCI bus (vendor 0x1ae0)"
    assert out["processes"] == 1 and out["devices"] == 2
    assert out["requested"] == "SIGTERM" and out["stop"] is True
    assert out["sync_step"] is not None, "JAX's notifier never saw the SIGTERM our handler received"
    assert out["restored"] and out["saved"] == 1

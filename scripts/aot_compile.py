#!/usr/bin/env python
"""Compile the real train step (and the decode step) for a TPU slice on a machine without one.

    pip install "jax[tpu]"      # libtpu provides the TPU compiler; no TPU needs to be attached
    python scripts/aot_compile.py --config configs/4b-4b_pretrain.yaml --topology v5p:4x4x8 \
        [--no-generate] [key=value ...]
    python scripts/aot_compile.py --config configs/tiny.yaml      # no topology: this machine's devices

Prints, per chip: argument, output, temporary and code bytes against the chip's HBM, and the
compiled FLOPs against the analytic count (`t5gemma2_jax.train.flops`), and the size of a
checkpoint; a program the TPU compiler refuses for lack of memory is reported as not fitting
(exit status 1, as for one that compiles above the chip's HBM). `--json FILE` appends the numbers
as one JSON line. The mesh, batch and lengths come from the config and its overrides, and
the program is the trainer's own (`t5gemma2_jax.train.Trainer`), so this is how a configuration is
checked to fit a pod before anyone pays for one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--topology", help="e.g. v5e:16x16, v5p:4x4x8, v6e:8x8 (default: the local devices)")
    p.add_argument("--no-generate", action="store_true", help="skip compiling the decode step")
    p.add_argument("--json", help="append results as one JSON line to this file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    a = p.parse_args(argv)

    import jax
    from jax.experimental import topologies

    from t5gemma2_jax.train import Trainer, compiled_flops, compiled_memory, load_config

    cfg = load_config(a.config, a.overrides)
    if a.topology:
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=a.topology).devices)
        hbm = HBM_GIB.get(a.topology.split(":")[0], 0) * 2**30
    else:
        devices, hbm = jax.devices(), 0
    trainer = Trainer.build(cfg, devices=devices)
    m, d, n = trainer.model_config, cfg.data, len(devices)
    print(f"{a.config} on {a.topology or 'the local devices'}: {n} chips ({devices[0].device_kind}), mesh {dict(trainer.mesh.shape)}, "
          f"batch {d.batch_size} x (enc {d.encoder_length}, dec {d.decoder_length}), remat {m.remat}, "
          f"attention {m.attention_backend}")
    sizes = trainer.state_sizes()
    state_per_chip = sizes["state"] / n     # the state's arguments (evenly sharded)
    ckpt_bytes, trainable = sizes["checkpoint"], sizes["trainable"]
    print(f"trainable parameters {trainable / 2**20:.1f} MiB; the state {state_per_chip / 2**30:.2f} GiB per chip; "
          f"a checkpoint holds {ckpt_bytes / 2**30:.3f} GiB"
          + ("" if trainer.saves_base else " (adapters and their optimizer state; the base stays where it came from)"))
    result = dict(config=a.config, topology=a.topology, chips=n, mesh=dict(trainer.mesh.shape),
                  batch=d.batch_size, encoder_length=d.encoder_length, decoder_length=d.decoder_length,
                  remat=m.remat, attention=m.attention_backend, hbm_per_chip=hbm, scan_layers=m.scan_layers,
                  trainable_bytes=trainable, state_bytes_per_chip=state_per_chip, checkpoint_bytes=ckpt_bytes,
                  lora=dataclasses.asdict(cfg.lora))
    if cfg.mesh.context > 1:
        import jax.numpy as jnp

        from t5gemma2_jax.parallel import context_traffic

        rows = d.batch_size / (trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"])
        moved = context_traffic(m, d.encoder_length, rows, cfg.mesh, jnp.dtype(m.dtype).itemsize)
        forward = sum(moved.values())
        passes = 3 if m.remat != "none" else 2       # forward, backward, and the remat recompute
        print(f"context axis: {forward / 2**20:.1f} MiB received per chip per forward pass (local-layer "
              f"halos {moved['local_halo'] / 2**20:.1f}, global-layer key gathers "
              f"{moved['global_gather'] / 2**20:.1f}, the decoder's gather of the encoder output "
              f"{moved['decoder_gather'] / 2**20:.1f}); {passes * forward / 2**30:.2f} GiB per train step")
        result.update(context_bytes_forward=moved, context_bytes_per_step=passes * forward)
    t0 = time.time()
    try:
        steps = trainer.compile(with_eval=False)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses a program that cannot fit the chip: that is the answer.
        reason = str(e).strip().splitlines()[0]
        print(f"does not fit: {reason}")
        result.update(fits=False, compile_seconds=time.time() - t0, error=reason)
        _write(a.json, result)
        return result
    compile_s = time.time() - t0
    mem, xla = compiled_memory(steps.train), compiled_flops(steps.train)
    flops = trainer.step_flops()
    per_chip = flops.train_per_step / n
    # What the compiled program should execute: remat recomputation included, and with the dense
    # backend every (masked) score. Comparable only when XLA sees every FLOP: a scanned layer stack
    # is counted once (not once per layer), so is the blockwise backend's loop over key blocks, and
    # Pallas kernels (splash) are not counted at all.
    dense = m.attention_backend == "dense"
    expected = trainer.step_flops(all_keys=dense).hardware_per_step(m.remat) / n
    comparable = not m.scan_layers and dense and cfg.train.microbatches == 1
    gib = lambda b: b / 2**30  # noqa: E731
    print(f"train step compiled in {compile_s:.0f} s. per chip: arguments {gib(mem['argument']):.2f} GiB, "
          f"temporaries {gib(mem['temp']):.2f} GiB, total {gib(mem['total']):.2f} GiB"
          + (f" of {gib(hbm):.0f} GiB HBM ({100 * mem['total'] / hbm:.0f}%)" if hbm else ""))
    print(f"analytic per chip: model FLOPs {per_chip / 1e12:.2f} T; with remat '{m.remat}'"
          f"{' and dense attention' if dense else ''} {expected / 1e12:.2f} T")
    if xla and comparable:
        print(f"compiled FLOPs per chip {xla / 1e12:.2f} T: {xla / expected:.3f} x the analytic count with remat")
    elif xla:
        why = (["the scanned layer stack is counted once"] if m.scan_layers else []) + (
            [f"the {m.attention_backend} attention is not fully visible to XLA"] if not dense else []) + (
            ["the micro-batch loop is counted once"] if cfg.train.microbatches > 1 else [])
        print(f"compiled FLOPs per chip {xla / 1e12:.2f} T (not comparable: {'; '.join(why)}; "
              "check with model.scan_layers=false model.attention_backend=dense)")
    result.update(memory_per_chip=mem, fits=bool(hbm == 0 or mem["total"] <= hbm), compiled_flops_per_chip=xla,
                  analytic_flops_per_chip=per_chip, expected_flops_per_chip=expected,
                  flops_comparable=comparable, compile_seconds=compile_s)
    if not a.no_generate:
        t0 = time.time()
        gmem = compiled_memory(trainer.compile_decode())
        print(f"encode + first decode step compiled in {time.time() - t0:.0f} s: total "
              f"{gib(gmem['total']):.2f} GiB per chip")
        result["generate_memory_per_chip"] = gmem
    _write(a.json, result)
    return result


def _write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(lambda: 0 if main()["fits"] else 1))   # 1: does not fit the chip

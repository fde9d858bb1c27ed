#!/usr/bin/env python
"""Compile the real train step (and the decode step) for a TPU slice on a machine without one.

    pip install "jax[tpu]"      # libtpu provides the TPU compiler; no TPU needs to be attached
    python scripts/aot_compile.py --config configs/4b-4b_pretrain.yaml --topology v5p:4x4x8 \
        [--no-generate] [key=value ...]

Prints, per chip: argument, output, temporary and code bytes against the chip's HBM, and the
compiled FLOPs against the analytic count (`t5gemma2_jax.train.flops`). `--json FILE` appends the
numbers as one JSON line. The mesh, batch and lengths come from the config and its overrides, so
this is how a configuration is checked to fit a pod before anyone pays for one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def _batch_shapes(cfg, model_cfg) -> dict[str, jax.ShapeDtypeStruct]:
    d = cfg.data
    B, S, T = d.batch_size, d.encoder_length, d.decoder_length
    i32 = jnp.int32
    shapes = {k: jax.ShapeDtypeStruct((B, S), i32) for k in ("encoder_input_ids", "encoder_segment_ids",
                                                              "encoder_positions")}
    shapes.update({k: jax.ShapeDtypeStruct((B, T), i32) for k in ("decoder_input_ids", "decoder_target_ids",
                                                                  "decoder_segment_ids", "decoder_positions")})
    shapes["decoder_loss_weights"] = jax.ShapeDtypeStruct((B, T), jnp.float32)
    if model_cfg.with_vision and d.max_images_per_row:
        v = model_cfg.vision
        shapes["pixel_values"] = jax.ShapeDtypeStruct((B, d.max_images_per_row, 3, v.image_size, v.image_size),
                                                      jnp.float32)
        shapes["image_mask"] = jax.ShapeDtypeStruct((B, d.max_images_per_row), jnp.bool_)
    return shapes


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code", "alias")}
    # Donated arguments alias outputs: count each buffer once.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True, help="e.g. v5e:16x16, v5p:4x4x8, v6e:8x8")
    p.add_argument("--no-generate", action="store_true", help="skip compiling the decode step")
    p.add_argument("--json", help="append results as one JSON line to this file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    a = p.parse_args(argv)

    from jax.experimental import topologies

    from t5gemma2_jax.sharding import axis_rules
    from t5gemma2_jax.train.config import load_config
    from t5gemma2_jax.train.flops import step_flops
    from t5gemma2_jax.train.mesh import check_batch, make_mesh, sharding_rules
    from t5gemma2_jax.train.state import ModelDef, abstract_state, make_optimizer
    from t5gemma2_jax.train.step import CompiledSteps

    cfg = load_config(a.config, a.overrides)
    topo = topologies.get_topology_desc(platform="tpu", topology_name=a.topology)
    devices = list(topo.devices)
    chip = a.topology.split(":")[0]
    hbm = HBM_GIB.get(chip, 0) * 2**30
    mesh = make_mesh(cfg.mesh, devices)
    check_batch(cfg.data.batch_size, mesh, cfg.train.microbatches)
    rules = sharding_rules(cfg.mesh)
    model_cfg = cfg.model_config()
    model_def = ModelDef(model_cfg, freeze_vision=cfg.train.freeze_vision)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    abstract, shardings = abstract_state(model_def, tx, cfg.train.seed, mesh, rules)
    batch = _batch_shapes(cfg, model_cfg)
    print(f"{a.config} on {a.topology}: {len(devices)} chips ({devices[0].device_kind}), mesh "
          f"{dict(mesh.shape)}, batch {cfg.data.batch_size} x (enc {cfg.data.encoder_length}, "
          f"dec {cfg.data.decoder_length}), remat {model_cfg.remat}, attention {model_cfg.attention_backend}")
    t0 = time.time()
    steps = CompiledSteps(model_def, tx, schedule, mesh, rules, abstract, shardings, batch,
                          z_loss=cfg.train.z_loss,
                          microbatches=cfg.train.microbatches, with_eval=False)
    compile_s = time.time() - t0
    mem = _memory(steps.train)
    xla = _flops(steps.train)
    images = cfg.data.max_images_per_row if model_cfg.with_vision else 0
    count = lambda all_keys: step_flops(  # noqa: E731
        model_cfg, batch=cfg.data.batch_size, encoder_length=cfg.data.encoder_length,
        decoder_length=cfg.data.decoder_length, images_per_row=images,
        vision_trainable=not cfg.train.freeze_vision, all_keys=all_keys)
    n = len(devices)
    per_chip = count(False).train_per_step / n
    # What the compiled program should execute: remat recomputation included, and with the dense
    # backend every (masked) score. Comparable only when XLA sees every FLOP: a scanned layer stack
    # is counted once (not once per layer), so is the blockwise backend's loop over key blocks, and
    # Pallas kernels (splash) are not counted at all.
    expected = count(model_cfg.attention_backend == "dense").hardware_per_step(model_cfg.remat) / n
    comparable = (not model_cfg.scan_layers and model_cfg.attention_backend == "dense"
                  and cfg.train.microbatches == 1)
    gib = lambda b: b / 2**30  # noqa: E731
    print(f"train step compiled in {compile_s:.0f} s. per chip: arguments {gib(mem['argument']):.2f} GiB, "
          f"temporaries {gib(mem['temp']):.2f} GiB, total {gib(mem['total']):.2f} GiB"
          + (f" of {gib(hbm):.0f} GiB HBM ({100 * mem['total'] / hbm:.0f}%)" if hbm else ""))
    print(f"analytic per chip: model FLOPs {per_chip / 1e12:.2f} T; with remat '{model_cfg.remat}'"
          f"{' and dense attention' if model_cfg.attention_backend == 'dense' else ''} {expected / 1e12:.2f} T")
    if xla and comparable:
        print(f"compiled FLOPs per chip {xla / 1e12:.2f} T: {xla / expected:.3f} x the analytic count with remat")
    elif xla:
        why = (["the scanned layer stack is counted once"] if model_cfg.scan_layers else []) + (
            [f"the {model_cfg.attention_backend} attention is not fully visible to XLA"]
            if model_cfg.attention_backend != "dense" else []) + (
            ["the micro-batch loop is counted once"] if cfg.train.microbatches > 1 else [])
        print(f"compiled FLOPs per chip {xla / 1e12:.2f} T (not comparable: {'; '.join(why)}; "
              "check with model.scan_layers=false model.attention_backend=dense)")
    result = dict(config=a.config, topology=a.topology, chips=len(devices), mesh=dict(mesh.shape),
                  batch=cfg.data.batch_size, encoder_length=cfg.data.encoder_length,
                  decoder_length=cfg.data.decoder_length, remat=model_cfg.remat,
                  attention=model_cfg.attention_backend, memory_per_chip=mem, hbm_per_chip=hbm,
                  fits=bool(hbm == 0 or mem["total"] <= hbm), compiled_flops_per_chip=xla,
                  analytic_flops_per_chip=per_chip, expected_flops_per_chip=expected,
                  flops_comparable=comparable, scan_layers=model_cfg.scan_layers, compile_seconds=compile_s)

    if not a.no_generate:
        from flax import nnx

        from t5gemma2_jax.model import T5Gemma2

        B, S, N = cfg.data.batch_size, cfg.data.encoder_length, cfg.data.decoder_length
        gen_cfg = model_cfg.replace(remat="none")
        with jax.set_mesh(mesh), axis_rules(rules):
            abstract_model = nnx.eval_shape(lambda: T5Gemma2(gen_cfg, rngs=nnx.Rngs(0)))
            graphdef, state = nnx.split(abstract_model)
            specs = model_def.param_specs(mesh, rules)

            def shard(path, leaf):
                name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                                if str(getattr(k, "name", "")) != "value")
                spec = specs.get(name, jax.sharding.PartitionSpec())
                return jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(gen_cfg.param_dtype) if leaf.dtype != jnp.int32
                                            else leaf.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

            abstract_params = jax.tree_util.tree_map_with_path(shard, state)
            batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

            def decode_one(state, ids):
                model = nnx.merge(graphdef, state)
                enc, seg = model.encode(ids)
                cache = model.init_cache(enc, seg, N)
                logits, cache = model.decode_step(jnp.full((ids.shape[0],), 2, jnp.int32), cache)
                return logits

            ids = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=batch_sh)
            t0 = time.time()
            gen = jax.jit(decode_one).lower(abstract_params, ids).compile()
            gmem = _memory(gen)
        print(f"encode + first decode step compiled in {time.time() - t0:.0f} s: total "
              f"{gib(gmem['total']):.2f} GiB per chip")
        result["generate_memory_per_chip"] = gmem
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    r = main()
    sys.exit(0 if r["fits"] else 1)

#!/usr/bin/env python
"""Train-step and generation throughput of one preset and shape on the current JAX backend,
optionally against transformers (PyTorch, eager) doing the same work in the same run.

    python scripts/benchmark.py --preset 270m-270m --encoder-length 512 --decoder-length 128 \
        --batch 2 --dtype float32 --vs-hf

Train step: forward + backward + AdamW update, the trainer's own compiled step
(`t5gemma2_jax.train.Trainer`, state donated), timed after one warm-up step.
Generation: encoder + `--new-tokens` greedy tokens with the KV cache (`t5gemma2_jax.generate`),
against `model.generate(do_sample=False, min_new_tokens=max_new_tokens)` in transformers.
TFLOP/s use the analytic count of `t5gemma2_jax.train.flops`; MFU divides by the device's
peak (a table for TPU/GPU, a measured fp32 matmul on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax
import numpy as np
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.train import Trainer
from t5gemma2_jax.train.config import from_dict
from t5gemma2_jax.train.flops import measured_cpu_peak, peak_flops_per_device, step_flops


def _batch(cfg, B, S, T, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, cfg.vocab_size, (B, S)).astype(np.int32)
    targets = rng.integers(10, cfg.vocab_size, (B, T)).astype(np.int32)
    dec = np.concatenate([np.full((B, 1), cfg.bos_token_id, np.int32), targets[:, :-1]], axis=1)
    return ids, dec, targets


def _time(fn, steps):
    fn()                                    # warm-up (compilation)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_jax_train(a, B, S, T, steps):
    """The trainer's step on unpacked rows (one example per row, as transformers gets them), with
    AdamW as `torch.optim.AdamW` defaults it: constant lr 1e-4, weight decay 0.01, no clipping."""
    cfg = from_dict({
        "model": {"preset": a.preset, "with_vision": False, "dtype": a.dtype, "param_dtype": "float32",
                  "attention_backend": a.attention, "remat": a.remat},
        "data": {"batch_size": B, "encoder_length": S, "decoder_length": T, "max_images_per_row": 0},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "optim": {"learning_rate": 1e-4, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01,
                  "clip_norm": 0.0},
        "train": {"data_source": "synthetic", "eval_every": 0},
    })
    trainer = Trainer.build(cfg, devices=jax.devices()[:1])
    compiled = trainer.compile()
    ids, dec, tgt = _batch(trainer.model_config, B, S, T)
    ones = lambda n: np.ones((B, n), np.int32)  # noqa: E731
    positions = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (B, n)).copy()  # noqa: E731
    batch = trainer.place_batch({
        "encoder_input_ids": ids, "encoder_segment_ids": ones(S), "encoder_positions": positions(S),
        "decoder_input_ids": dec, "decoder_target_ids": tgt, "decoder_loss_weights": ones(T).astype(np.float32),
        "decoder_segment_ids": ones(T), "decoder_positions": positions(T)})
    state = [trainer.init_state()]

    def run():
        state[0], metrics = compiled.train(state[0], batch)
        metrics["loss"].block_until_ready()

    return _time(run, steps)


def bench_jax_generate(cfg, B, S, N, steps):
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    ids, _, _ = _batch(cfg, B, S, 1)
    # eos = -1: never stop early, so both sides produce exactly N tokens.
    return _time(lambda: np.asarray(tg.generate(model, ids, max_new_tokens=N, eos_id=-1)), steps)


def _hf_model(cfg, device: str = "cpu", dtype: str = "float32"):
    """transformers' T5Gemma 2 of the same config with random weights, on `device` in `dtype`, with
    PyTorch's scaled-dot-product attention (its fastest built-in kernel on GPU)."""
    import torch
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration
    from t5gemma2_jax.checkpoints.hf_config import config_to_hf

    hf_cfg = T5Gemma2Config.from_dict(config_to_hf(cfg, "float32"))
    torch.manual_seed(0)
    model = T5Gemma2ForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa")
    return model.to(device=device, dtype=getattr(torch, dtype))


def _synced(fn, device: str):
    import torch

    def run():
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return run


def bench_hf_train(cfg, B, S, T, steps, device="cpu", dtype="float32"):
    import torch

    model = _hf_model(cfg, device, dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, dec, tgt = (torch.as_tensor(x, dtype=torch.long, device=device) for x in _batch(cfg, B, S, T))

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, decoder_input_ids=dec, labels=tgt)
        out.loss.backward()
        opt.step()

    return _time(_synced(run, device), steps)


def bench_hf_generate(cfg, B, S, N, steps, device="cpu", dtype="float32"):
    import torch

    model = _hf_model(cfg, device, dtype).eval()
    ids = torch.as_tensor(_batch(cfg, B, S, 1)[0], dtype=torch.long, device=device)

    def run():
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)

    return _time(_synced(run, device), steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="270m-270m", choices=tg.PRESETS)
    p.add_argument("--encoder-length", type=int, default=512)
    p.add_argument("--decoder-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="auto", choices=("auto", "dense", "blockwise", "cudnn"),
                   help="the config's attention_backend (default: the package default)")
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--what", default="train,generate")
    p.add_argument("--vs-hf", action="store_true", help="also time transformers (PyTorch) doing the same work")
    p.add_argument("--hf-device", default="cpu", help="torch device for --vs-hf (e.g. cuda); dtype as --dtype")
    p.add_argument("--json", help="append the results as one JSON line to this file")
    a = p.parse_args(argv)

    cfg = tg.preset(a.preset, with_vision=False, dtype=a.dtype, param_dtype="float32",
                    attention_backend=a.attention, remat=a.remat)
    B, S, T, N = a.batch, a.encoder_length, a.decoder_length, a.new_tokens
    dev = jax.devices()[0]
    peak, peak_src = peak_flops_per_device(dev)
    if dev.platform == "cpu":
        peak, peak_src = measured_cpu_peak(size=2048) * len(jax.local_devices()), "measured fp32 matmul (2048²)"
    flops = step_flops(cfg, batch=B, encoder_length=S, decoder_length=T)
    train_flops = flops.train_per_step
    result = dict(preset=a.preset, batch=B, encoder_length=S, decoder_length=T, dtype=a.dtype,
                  attention=a.attention, device=f"{dev.platform}:{dev.device_kind}", host=platform.processor()
                  or platform.machine(), cpus=os.cpu_count(), peak_tflops=peak / 1e12, peak_source=peak_src)
    what = set(a.what.split(","))
    if "train" in what:
        t = bench_jax_train(a, B, S, T, a.steps)
        result.update(train_step_s=t, train_tokens_per_s=B * (S + T) / t, train_tflops=train_flops / t / 1e12,
                      train_mfu=(train_flops / t / peak) if peak else None)
        print(f"jax train step: {t:.3f} s  {B * (S + T) / t:.1f} tok/s  {train_flops / t / 1e12:.3f} TFLOP/s"
              + (f"  MFU {100 * train_flops / t / peak:.1f}% of {peak / 1e12:.2f} ({peak_src})" if peak else ""))
        if a.vs_hf:
            th = bench_hf_train(cfg, B, S, T, a.steps, a.hf_device, a.dtype)
            result.update(hf_train_step_s=th, train_speedup_vs_hf=th / t)
            print(f"transformers train step: {th:.3f} s  -> jax is {th / t:.2f}x faster")
    if "generate" in what:
        t = bench_jax_generate(cfg, B, S, N, a.steps)
        result.update(generate_s=t, generate_tokens_per_s=B * N / t)
        print(f"jax generate ({N} new tokens): {t:.3f} s  {B * N / t:.1f} tok/s")
        if a.vs_hf:
            th = bench_hf_generate(cfg, B, S, N, a.steps, a.hf_device, a.dtype)
            result.update(hf_generate_s=th, generate_speedup_vs_hf=th / t)
            print(f"transformers generate: {th:.3f} s  -> jax is {th / t:.2f}x faster")
    # The process's high-water mark of host memory (Linux reports KiB): what training or generation
    # at these shapes needed on this host, parameters, state and compiled programs included.
    result["peak_host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak host memory: {result['peak_host_memory_gb']:.2f} GiB")
    print(json.dumps(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(lambda: 0 if main() else 1))

#!/usr/bin/env python
"""Train-step and generation throughput of one preset and shape on the current JAX backend,
optionally against transformers (PyTorch, eager) doing the same work in the same run.

    python scripts/benchmark.py --preset 270m-270m --encoder-length 512 --decoder-length 128 \
        --batch 2 --dtype float32 --vs-hf

Train step: forward + backward + AdamW update, the trainer's own compiled step
(`t5gemma2_jax.train.Trainer`, state donated), timed after one warm-up step. `--breakdown` also
times its parts as separate programs (`Trainer.compile_parts`: forward + loss, forward + backward,
the optimizer update) with each one's fraction of the peak.
Generation: encoder + `--new-tokens` greedy tokens with the KV cache (`t5gemma2_jax.generate`),
against `model.generate(do_sample=False, min_new_tokens=max_new_tokens)` in transformers.
TFLOP/s use the analytic count of `t5gemma2_jax.train.flops`; MFU divides by the device's
peak (a table for TPU/GPU, a measured fp32 matmul on CPU); `--peak-matmul N` also measures an N³
matmul in `--dtype` on the device and reports MFU against that beside it. Each part reports the
peak host memory it reached (the process's high-water mark, reset before each part where Linux
allows) and, on an accelerator, the peak device memory: JAX's `peak_bytes_in_use` (the process's
high-water mark: it cannot be reset, so `scripts/gpu_check.sh` runs each part in a process of its
own) and torch's `max_memory_allocated` (reset before each part).
`--framework hf` runs transformers' side alone (`--hf-device cuda`: keep JAX off the GPU with
`JAX_PLATFORMS=cpu`, or its allocator takes most of the GPU's memory first). In bfloat16,
`--hf-precision autocast` (the default) keeps float32 weights and AdamW state and runs the forward
under `torch.autocast(bfloat16)`, as the JAX side keeps float32 master weights and computes in
bfloat16; `weights` casts the model to bfloat16 instead. `--profile FILE` traces two more train
steps with `jax.profiler` and writes where their time went as text (`t5gemma2_jax.train.trace_summary`).
`--summarize FILE` reads the JSON lines of such runs and prints one row per shape against the targets.

Like the other scripts that run a model, it runs under glibc's transparent-huge-page tunable
(`scripts/hugepages.py`: XLA:CPU's per-call temporaries fault in 2 MiB pages instead of 4 KiB
ones); `--no-hugepages` re-runs it with the kernel's default pages, for a side-by-side figure.
Both frameworks run in the one process, so both get the same allocator.
"""

from __future__ import annotations

import sys

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages(on="--no-hugepages" not in sys.argv)

import argparse
import contextlib
import json
import os
import platform
import resource
import time
from types import SimpleNamespace

import jax
import numpy as np
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.hf_config import transformers_model
from t5gemma2_jax.experiment import from_dict
from t5gemma2_jax.train import Trainer
from t5gemma2_jax.train.flops import measured_cpu_peak, measured_matmul_peak, peak_flops_per_device, step_flops
from t5gemma2_jax.train.trace_summary import trace


def _batch(cfg, B, S, T, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, cfg.vocab_size, (B, S)).astype(np.int32)
    targets = rng.integers(10, cfg.vocab_size, (B, T)).astype(np.int32)
    dec = np.concatenate([np.full((B, 1), cfg.bos_token_id, np.int32), targets[:, :-1]], axis=1)
    return ids, dec, targets


def _reset_peak_memory() -> bool:
    """Reset the process's resident-memory high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_memory_gb() -> float:
    """The resident-memory high-water mark since the last reset (else of the whole run), GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _time(fn, steps):
    fn()                                    # warm-up (compilation)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _train_config(a, B, S, T):
    """The trainer's config for unpacked rows (one example per row, as transformers gets them),
    with AdamW as `torch.optim.AdamW` defaults it: constant lr 1e-4, weight decay 0.01, no clipping."""
    return from_dict({
        "model": {"preset": a.preset, "with_vision": False, "dtype": a.dtype, "param_dtype": "float32",
                  "attention_backend": a.attention, "remat": a.remat, "scan_layers": not a.no_scan},
        "data": {"batch_size": B, "encoder_length": S, "decoder_length": T, "max_images_per_row": 0},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "optim": {"learning_rate": 1e-4, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01,
                  "clip_norm": 0.0},
        "train": {"data_source": "synthetic", "eval_every": 0},
    })


def _train_batch(trainer, B, S, T):
    ids, dec, tgt = _batch(trainer.model_config, B, S, T)
    ones = lambda n: np.ones((B, n), np.int32)  # noqa: E731
    positions = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (B, n)).copy()  # noqa: E731
    return trainer.place_batch({
        "encoder_input_ids": ids, "encoder_segment_ids": ones(S), "encoder_positions": positions(S),
        "decoder_input_ids": dec, "decoder_target_ids": tgt, "decoder_loss_weights": ones(T).astype(np.float32),
        "decoder_segment_ids": ones(T), "decoder_positions": positions(T)})


def bench_jax_train(a, B, S, T, steps, profile_steps=0):
    """Seconds of the trainer's compiled train step (state donated), median of `steps`; with
    `profile_steps`, also the `ProfileSummary` of that many more steps traced (else None)."""
    trainer = Trainer.build(_train_config(a, B, S, T), devices=jax.devices()[:1])
    compiled = trainer.compile()
    batch = _train_batch(trainer, B, S, T)
    state = [trainer.init_state()]

    def run():
        state[0], metrics = compiled.train(state[0], batch)
        metrics["loss"].block_until_ready()

    t = _time(run, steps)
    return t, (trace(run, profile_steps) if profile_steps else None)


def bench_jax_parts(a, B, S, T, steps):
    """Seconds of the train step's parts compiled one by one (`Trainer.compile_parts`): forward +
    loss, forward + backward, and the optimizer update (state donated); medians of `steps`."""
    trainer = Trainer.build(_train_config(a, B, S, T), devices=jax.devices()[:1])
    parts = trainer.compile_parts()
    batch = _train_batch(trainer, B, S, T)
    state = [trainer.init_state()]
    out = {"forward": _time(lambda: parts.forward(state[0], batch).block_until_ready(), steps)}
    grads = [None]

    def gradient():
        loss, grads[0] = parts.gradient(state[0], batch)
        loss.block_until_ready()

    out["gradient"] = _time(gradient, steps)
    loss = parts.forward(state[0], batch)

    def update():
        state[0] = parts.update(state[0], grads[0], loss)
        jax.block_until_ready(state[0])

    out["update"] = _time(update, steps)
    out["state_bytes"] = trainer.state_sizes()["trainable"]
    return out


def bench_jax_generate(cfg, B, S, N, steps):
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    ids, _, _ = _batch(cfg, B, S, 1)
    # eos = -1: never stop early, so both sides produce exactly N tokens.
    return _time(lambda: np.asarray(tg.generate(model, ids, max_new_tokens=N, eos_id=-1)), steps)


def jax_peak_device_memory_gb(device) -> float | None:
    """JAX's high-water mark of the device's memory in this process, GiB (None where the backend
    keeps no statistics, as on CPU)."""
    stats = device.memory_stats()
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def _synced(fn, device: str):
    import torch

    def run():
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return run


def hf_precision_name(dtype: str, precision: str) -> str:
    """What the transformers side computes in: float32, or bfloat16 by `autocast` or by `weights`."""
    return "float32" if dtype == "float32" else precision


def _hf_model(cfg, device, dtype, precision):
    """transformers' model and the context its forward runs under (see the module docstring)."""
    import torch

    if hf_precision_name(dtype, precision) == "autocast":
        model = transformers_model(cfg, device=device, dtype="float32")
        return model, lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return transformers_model(cfg, device=device, dtype=dtype), contextlib.nullcontext


def _hf_memory_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def hf_peak_device_memory_gb(device: str) -> float | None:
    """torch's peak allocated device memory since the last reset, GiB (None off CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def bench_hf_train(cfg, B, S, T, steps, device="cpu", dtype="float32", precision="autocast"):
    import torch

    _hf_memory_reset(device)
    model, compute = _hf_model(cfg, device, dtype, precision)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, dec, tgt = (torch.as_tensor(x, dtype=torch.long, device=device) for x in _batch(cfg, B, S, T))

    def run():
        opt.zero_grad(set_to_none=True)
        with compute():
            out = model(input_ids=ids, decoder_input_ids=dec, labels=tgt)
        out.loss.backward()
        opt.step()

    t = _time(_synced(run, device), steps)
    del model, opt
    return t


def bench_hf_generate(cfg, B, S, N, steps, device="cpu", dtype="float32", precision="autocast"):
    import torch

    _hf_memory_reset(device)
    model, compute = _hf_model(cfg, device, dtype, precision)
    model.eval()
    ids = torch.as_tensor(_batch(cfg, B, S, 1)[0], dtype=torch.long, device=device)

    def run():
        with torch.no_grad(), compute():
            model.generate(input_ids=ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)

    return _time(_synced(run, device), steps)


# What `--summarize` reports against (the GPU benchmark's acceptance targets).
TARGETS = {"train_mfu": 0.40, "train_speedup_vs_hf": 1.5, "generate_speedup_vs_hf": 2.0}
SHAPE_KEYS = ("preset", "batch", "encoder_length", "decoder_length", "dtype")


def summarize(lines: list[dict]) -> list[dict]:
    """One row per shape from the JSON lines of separate runs (JAX's parts, transformers' parts,
    each possibly a process of its own): their fields merged, the ratios between the frameworks,
    and each target met (True/False, or None where a side is missing)."""
    rows: dict[tuple, dict] = {}
    for line in lines:
        if "preset" not in line:
            continue
        row = rows.setdefault(tuple(line.get(k) for k in SHAPE_KEYS), {})
        for k, v in line.items():
            if v is not None or k not in row:
                row[k] = v
        if line.get("error"):
            row.setdefault("errors", []).append(f"{line.get('part', '?')}: {line['error']}")
    out = []
    for row in rows.values():
        if row.get("train_step_s") and row.get("hf_train_step_s"):
            row["train_speedup_vs_hf"] = row["hf_train_step_s"] / row["train_step_s"]
        if row.get("generate_s") and row.get("hf_generate_s"):
            row["generate_speedup_vs_hf"] = row["hf_generate_s"] / row["generate_s"]
        row["targets"] = {k: (row[k] >= v if row.get(k) is not None else None) for k, v in TARGETS.items()}
        out.append(row)
    return out


def summary_text(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = []
    for r in rows:
        lines.append(f"{r['preset']} batch {r['batch']} x ({r['encoder_length']} + {r['decoder_length']}) {r['dtype']}"
                     f" on {r.get('device', '?')}")
        lines.append(f"  train step   jax {f(r.get('train_step_s'), '.3f')} s  MFU {f(r.get('train_mfu'), '.1%')} of "
                     f"{f(r.get('peak_tflops'), '.4g')} (datasheet), {f(r.get('train_mfu_measured'), '.1%')} of "
                     f"{f(r.get('measured_peak_tflops'), '.4g')} TFLOP/s (measured)  |  transformers "
                     f"{f(r.get('hf_train_step_s'), '.3f')} s ({r.get('hf_precision', '-')})  ->  "
                     f"{f(r.get('train_speedup_vs_hf'), '.2f')}x")
        lines.append(f"  generation   jax {f(r.get('generate_tokens_per_s'), '.0f')} tok/s  |  transformers "
                     f"{f(r.get('hf_generate_tokens_per_s'), '.0f')} tok/s  ->  {f(r.get('generate_speedup_vs_hf'), '.2f')}x")
        lines.append(f"  peak device memory GiB: jax train {f(r.get('train_peak_device_memory_gb'), '.1f')}, generate "
                     f"{f(r.get('generate_peak_device_memory_gb'), '.1f')}; transformers train "
                     f"{f(r.get('hf_train_peak_device_memory_gb'), '.1f')}, generate "
                     f"{f(r.get('hf_generate_peak_device_memory_gb'), '.1f')}")
        lines.append("  targets: " + ", ".join(f"{k} >= {TARGETS[k]}: {'-' if v is None else ('met' if v else 'MISSED')}"
                                              for k, v in r["targets"].items()))
        if r.get("hf_skipped"):
            lines.append(f"  transformers skipped: {r['hf_skipped']}")
        for e in r.get("errors", []):
            lines.append(f"  failed: {e}")
    return "\n".join(lines)


def _versions(framework: str) -> dict[str, str]:
    from importlib import metadata

    names = ("jax", "jaxlib", "flax") if framework == "jax" else ("torch", "transformers")
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


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
    p.add_argument("--no-scan", action="store_true", help="run every layer unscanned (model.scan_layers=false)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the train step's parts: forward + loss, backward, optimizer update")
    p.add_argument("--no-hugepages", action="store_true",
                   help="re-run with the kernel's default 4 KiB pages (see the module docstring)")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--what", default="train,generate", help="comma-separated parts: train, generate")
    p.add_argument("--framework", default="jax", choices=("jax", "hf"),
                   help="whose parts to run: JAX's (this package), or transformers' alone")
    p.add_argument("--vs-hf", action="store_true", help="also time transformers (PyTorch) doing the same work")
    p.add_argument("--hf-device", default="cpu", help="torch device for transformers (e.g. cuda); dtype as --dtype")
    p.add_argument("--hf-precision", default="autocast", choices=("autocast", "weights"),
                   help="transformers in bfloat16: float32 weights under torch.autocast, or bfloat16 weights")
    p.add_argument("--peak-matmul", type=int, default=0, metavar="N",
                   help="also measure the peak of an N^3 matmul in --dtype on the device (e.g. 8192)")
    p.add_argument("--profile", metavar="FILE", help="trace two more train steps, write the summary here")
    p.add_argument("--json", help="append the results as one JSON line to this file")
    p.add_argument("--summarize", metavar="FILE", help="print the rows of FILE's JSON lines against the targets")
    a = p.parse_args(argv)
    what = set(a.what.split(","))
    if not what <= {"train", "generate"}:
        p.error(f"--what: unknown parts {sorted(what - {'train', 'generate'})} (train, generate)")
    for name in ("encoder_length", "decoder_length", "batch", "steps", "new_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.summarize:
        try:
            lines = [json.loads(x) for x in open(a.summarize) if x.strip()]
        except (OSError, ValueError) as e:
            p.error(f"--summarize: cannot read {a.summarize}: {e}")
        rows = summarize(lines)
        print(summary_text(rows))
        return rows

    cfg = tg.preset(a.preset, with_vision=False, dtype=a.dtype, param_dtype="float32",
                    attention_backend=a.attention, remat=a.remat, scan_layers=not a.no_scan)
    B, S, T, N = a.batch, a.encoder_length, a.decoder_length, a.new_tokens
    jax_side, hf_side = a.framework == "jax", a.framework == "hf" or a.vs_hf
    if jax_side:
        dev = jax.devices()[0]
        device_name = f"{dev.platform}:{dev.device_kind}"
        peak, peak_src = peak_flops_per_device(dev)
        if dev.platform == "cpu":
            peak, peak_src = measured_cpu_peak() * len(jax.local_devices()), "measured fp32 matmul (2048²)"
    else:
        import torch

        kind = torch.cuda.get_device_name() if a.hf_device.startswith("cuda") else platform.processor() or "cpu"
        device_name = f"{a.hf_device.split(':')[0]}:{kind}"
        peak, peak_src = peak_flops_per_device(SimpleNamespace(device_kind=kind, platform="gpu")) \
            if a.hf_device.startswith("cuda") else (0.0, "not measured for transformers on CPU")
    flops = step_flops(cfg, batch=B, encoder_length=S, decoder_length=T)
    train_flops = flops.train_per_step
    result = dict(preset=a.preset, batch=B, encoder_length=S, decoder_length=T, dtype=a.dtype,
                  attention=a.attention, scan_layers=not a.no_scan, remat=a.remat, framework=a.framework,
                  part=",".join(sorted(what)), new_tokens=N, steps=a.steps,
                  device=device_name, host=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), peak_tflops=peak / 1e12, peak_source=peak_src,
                  train_flops_per_step=train_flops, glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                  versions=_versions("jax") | (_versions("hf") if hf_side else {}))
    if hf_side:
        result.update(hf_device=a.hf_device, hf_precision=hf_precision_name(a.dtype, a.hf_precision))
    print(f"host allocator: GLIBC_TUNABLES={result['glibc_tunables'] or '(default)'}")
    if a.peak_matmul and jax_side:
        measured = measured_matmul_peak(dev, a.peak_matmul, a.dtype)
        result.update(measured_peak_tflops=measured / 1e12,
                      measured_peak_source=f"{a.dtype} matmul {a.peak_matmul}^3 on {device_name}")
        print(f"measured peak: {measured / 1e12:.1f} TFLOP/s ({result['measured_peak_source']}); "
              f"{peak_src}: {peak / 1e12:.1f}")
    resets = _reset_peak_memory()

    def peak_memory(key: str) -> str:
        """Record the high-water mark of the part just run as `key` (and reset it for the next)."""
        result[key] = _peak_memory_gb()
        _reset_peak_memory()
        return f"  peak host memory {result[key]:.2f} GiB" if resets else ""

    def device_memory(key: str, gb: float | None) -> str:
        result[key] = gb
        return f"  peak device memory {gb:.2f} GiB" if gb is not None else ""

    mfu = lambda f, t: f"  {100 * f / t / peak:.1f}% of peak" if peak else ""  # noqa: E731
    if "train" in what and jax_side:
        t, prof = bench_jax_train(a, B, S, T, a.steps, profile_steps=2 if a.profile else 0)
        result.update(train_step_s=t, train_tokens_per_s=B * (S + T) / t, train_tflops=train_flops / t / 1e12,
                      train_mfu=(train_flops / t / peak) if peak else None)
        if "measured_peak_tflops" in result:
            result["train_mfu_measured"] = train_flops / t / (result["measured_peak_tflops"] * 1e12)
        print(f"jax train step: {t:.3f} s  {B * (S + T) / t:.1f} tok/s  {train_flops / t / 1e12:.3f} TFLOP/s"
              + (f"  MFU {100 * train_flops / t / peak:.1f}% of {peak / 1e12:.2f} ({peak_src})" if peak else "")
              + peak_memory("train_peak_host_memory_gb")
              + device_memory("train_peak_device_memory_gb", jax_peak_device_memory_gb(dev)))
        if prof is not None:
            text = (f"{a.preset} train step, batch {B} x ({S} + {T}) {a.dtype}, {a.attention} attention, on "
                    f"{device_name}: {t:.3f} s a step (median of {a.steps})\n" + prof.text())
            with open(a.profile, "w") as f:
                f.write(text + "\n")
            result.update(profile=a.profile, profile_top=prof.top(), profile_by_kind=prof.by_kind)
            print(text)
        if a.breakdown:
            parts = bench_jax_parts(a, B, S, T, a.steps)
            fwd_flops = flops.forward_per_row * B
            tf, tb, tu = parts["forward"], parts["gradient"] - parts["forward"], parts["update"]
            # The update reads parameters, gradients and both moments and writes three of them back.
            update_gbs = 7 * parts["state_bytes"] / tu / 1e9
            result.update(forward_s=tf, backward_s=tb, update_s=tu, backward_over_forward=tb / tf,
                          forward_mfu=fwd_flops / tf / peak if peak else None,
                          backward_mfu=(train_flops - fwd_flops) / tb / peak if peak else None,
                          update_gb_per_s=update_gbs)
            print(f"  forward + loss {tf:.3f} s{mfu(fwd_flops, tf)}\n"
                  f"  backward       {tb:.3f} s{mfu(train_flops - fwd_flops, tb)}  ({tb / tf:.2f}x the forward)\n"
                  f"  update         {tu:.3f} s  ({update_gbs:.1f} GB/s: 7 passes over {parts['state_bytes'] / 1e9:.2f} GB)"
                  + peak_memory("parts_peak_host_memory_gb"))
    if "train" in what and hf_side:
        th = bench_hf_train(cfg, B, S, T, a.steps, a.hf_device, a.dtype, a.hf_precision)
        result.update(hf_train_step_s=th, hf_train_tokens_per_s=B * (S + T) / th,
                      hf_train_mfu=(train_flops / th / peak) if peak else None)
        if result.get("train_step_s"):
            result["train_speedup_vs_hf"] = th / result["train_step_s"]
        print(f"transformers train step: {th:.3f} s  {B * (S + T) / th:.1f} tok/s"
              + (f"  -> jax is {th / result['train_step_s']:.2f}x faster" if result.get("train_step_s") else "")
              + peak_memory("hf_train_peak_host_memory_gb")
              + device_memory("hf_train_peak_device_memory_gb", hf_peak_device_memory_gb(a.hf_device)))
    if "generate" in what and jax_side:
        t = bench_jax_generate(cfg, B, S, N, a.steps)
        result.update(generate_s=t, generate_tokens_per_s=B * N / t)
        print(f"jax generate ({N} new tokens): {t:.3f} s  {B * N / t:.1f} tok/s"
              + peak_memory("generate_peak_host_memory_gb")
              + device_memory("generate_peak_device_memory_gb", jax_peak_device_memory_gb(dev)))
    if "generate" in what and hf_side:
        th = bench_hf_generate(cfg, B, S, N, a.steps, a.hf_device, a.dtype, a.hf_precision)
        result.update(hf_generate_s=th, hf_generate_tokens_per_s=B * N / th)
        if result.get("generate_s"):
            result["generate_speedup_vs_hf"] = th / result["generate_s"]
        print(f"transformers generate: {th:.3f} s  {B * N / th:.1f} tok/s"
              + (f"  -> jax is {th / result['generate_s']:.2f}x faster" if result.get("generate_s") else "")
              + peak_memory("hf_generate_peak_host_memory_gb")
              + device_memory("hf_generate_peak_device_memory_gb", hf_peak_device_memory_gb(a.hf_device)))
    # The process's high-water mark of host memory over the whole run (Linux reports KiB): what
    # training or generation at these shapes needed on this host, state and programs included.
    result["peak_host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak host memory of the run: {result['peak_host_memory_gb']:.2f} GiB")
    print(json.dumps(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(lambda: 0 if main() else 1))

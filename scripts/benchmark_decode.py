#!/usr/bin/env python
"""Per-step cost of cached greedy decoding against the bound of reading what a step must read.

    python scripts/benchmark_decode.py --preset 270m-270m --encoder-length 512 --batch 2 --new-tokens 32

One package call, `t5gemma2_jax.generate`, timed with 1 and with 1 + N new tokens (eos disabled,
so both run to the end): the difference over N is one decoding step; the first is the encoder,
the cache's initialisation and one step. A step must read the decoder layers' weights, the LM
head's table, and every layer's cache (its self slots and its encoder keys/values); the read
bandwidth is measured here (the faster of a compiled sum and max over a flat 1 GiB float32 array,
which XLA:CPU spreads over the cores), so the bound is bytes / bandwidth on this machine, as
loaded as the timing.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import t5gemma2_jax as tg


def _best(fn, reps: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) of `reps` calls after a warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def read_bandwidth(nbytes: int = 2**30, reps: int = 5) -> float:
    """Bytes per second of the fastest compiled full reduction (sum, max) over a flat float32 array
    of `nbytes`: XLA:CPU splits a flat reduction across the cores, which is what a read bound
    needs. A sum over a `[rows, 1024]` array runs on one core instead and reads about half as fast
    (docs/benchmarks_archive.md), which would make every step look nearer its bound."""
    x = jax.random.uniform(jax.random.key(0), (nbytes // 4,), jnp.float32)
    best = min(_best(lambda: f(x).block_until_ready(), reps)[0] for f in (jax.jit(jnp.sum), jax.jit(jnp.max)))
    return nbytes / best


def step_bytes(model, batch: int, encoder_length: int, new_tokens: int) -> dict[str, int]:
    """Bytes one decoding step reads: decoder weights, head table, caches (from abstract shapes)."""
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    enc = jax.ShapeDtypeStruct((batch, encoder_length, model.config.encoder.hidden_size),
                               jnp.dtype(model.config.dtype))
    seg = jax.ShapeDtypeStruct((batch, encoder_length), jnp.int32)
    cache = jax.eval_shape(lambda e, s: model.init_cache(e, s, new_tokens), enc, seg)
    return {"decoder_weights": nbytes(nnx.state(model.decoder, nnx.Param)),
            "head_table": nbytes(model.output_head.table[...]),
            "caches": nbytes(cache["layers"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="270m-270m", choices=tg.PRESETS)
    p.add_argument("--encoder-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32, help="N: the steps timed beyond the first")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each call (best reported)")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the array the bandwidth is read from")
    p.add_argument("--json", help="append the results as one JSON line to this file")
    a = p.parse_args(argv)

    cfg = tg.preset(a.preset, with_vision=False, dtype=a.dtype, param_dtype="float32")
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    B, S, N = a.batch, a.encoder_length, a.new_tokens
    ids = np.random.default_rng(0).integers(10, cfg.vocab_size, (B, S)).astype(np.int32)
    run = lambda n: np.asarray(tg.generate(model, ids, max_new_tokens=n, eos_id=-1))  # noqa: E731
    (first, first_cpu), (last, last_cpu) = _best(lambda: run(1), a.reps), _best(lambda: run(1 + N), a.reps)
    step, step_cpu = (last - first) / N, (last_cpu - first_cpu) / N
    parts = step_bytes(model, B, S, 1 + N)
    bandwidth = read_bandwidth(a.bandwidth_mib * 2**20)
    bound = sum(parts.values()) / bandwidth
    result = dict(preset=a.preset, batch=B, encoder_length=S, new_tokens=N, dtype=a.dtype,
                  first_token_s=first, step_s=step, step_cpu_s=step_cpu, step_bytes=parts,
                  read_bandwidth_gbs=bandwidth / 1e9, bound_s=bound, step_over_bound=step / bound,
                  load_average=os.getloadavg()[0])
    print(f"first token (encoder + cache + 1 step): {first:.3f} s")
    print(f"per step: {step * 1e3:.1f} ms wall, {step_cpu * 1e3:.1f} ms CPU (best of {a.reps}, "
          f"{1 + N} against 1 new tokens)")
    print("reads per step: " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in parts.items())
          + f"; at {bandwidth / 1e9:.1f} GB/s: {bound * 1e3:.1f} ms -> {step / bound:.2f}x the bound")
    print(f"load average {result['load_average']:.1f}")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()

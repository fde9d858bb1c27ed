#!/usr/bin/env python
"""Attention cost against sequence length, per backend and layer kind (forward + backward).

    python scripts/benchmark_attention.py --lengths 4096 16384 --window 512 --heads 4 --kv-heads 1

Local (sliding-window) layers of the blockwise backend should grow linearly with length
(time at 16K <= 1.3 x 4 x time at 4K); global layers should be no slower than dense.
Dense is skipped where its [T, T] score matrix would not fit `--dense-limit-gib`.
"""

from __future__ import annotations

import sys

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from t5gemma2_jax.nn.backends import attend
from t5gemma2_jax.nn.masks import MaskInfo, bidirectional_window


def _timed(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def run(T, kind, backend, a):
    B, H, K, d = a.batch, a.heads, a.kv_heads, a.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, d)), a.dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, d)), a.dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, d)), a.dtype)
    seg = jnp.ones((B, T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    window = bidirectional_window(a.window) if kind == "local" else None
    mask = MaskInfo(seg, pos, seg, pos, window=window)

    @jax.jit
    def fwd_bwd(q, k, v):
        return jax.grad(lambda q, k, v: attend(q, k, v, mask, scale=d ** -0.5, backend=backend,
                                               block_size=a.block).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    return _timed(fwd_bwd, q, k, v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dense-limit-gib", type=float, default=4.0)
    p.add_argument("--json")
    a = p.parse_args(argv)
    rows = []
    for kind in ("local", "global"):
        for backend in ("blockwise", "dense"):
            for T in a.lengths:
                score_gib = a.batch * a.heads * T * T * 4 / 2**30
                if backend == "dense" and score_gib > a.dense_limit_gib:
                    print(f"{kind:6s} {backend:9s} T={T:6d}: skipped (scores {score_gib:.1f} GiB)")
                    continue
                t = run(T, kind, backend, a)
                rows.append(dict(kind=kind, backend=backend, length=T, seconds=t))
                print(f"{kind:6s} {backend:9s} T={T:6d}: {t * 1e3:9.1f} ms (fwd+bwd)")
    by = {(r["kind"], r["backend"], r["length"]): r["seconds"] for r in rows}
    lo, hi = min(a.lengths), max(a.lengths)
    if ("local", "blockwise", lo) in by and ("local", "blockwise", hi) in by:
        ratio = by[("local", "blockwise", hi)] / by[("local", "blockwise", lo)]
        print(f"local blockwise: time({hi}) / time({lo}) = {ratio:.2f} (linear would be {hi / lo:.1f})")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(dict(args=vars(a), rows=rows)) + "\n")


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

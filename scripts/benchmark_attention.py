#!/usr/bin/env python
"""Attention cost against sequence length, per backend and layer kind (forward + backward).

    python scripts/benchmark_attention.py --lengths 4096 16384 --window 512 --heads 4 --kv-heads 1
    python scripts/benchmark_attention.py --sweep --preset 270m-270m --lengths 256 512 1024 2048 4096
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python scripts/benchmark_attention.py --context 4 --lengths 4096 16384 --window 512 --kinds local --backends blockwise

Local (sliding-window) layers of the blockwise backend should grow linearly with length
(time at 16K <= 1.3 x 4 x time at 4K), also with the sequence split over `--context` devices
(each exchanges only the window's halo); global layers should be no slower than dense.
Dense is skipped where its [T, T] score matrix would not fit `--dense-limit-gib`.

`--sweep` times dense against blockwise side by side at each length, forward alone and forward +
backward, for the three masks of a model (encoder local window, encoder global, decoder merged
over `[--decoder-length self keys | L encoder keys]`), with the head layout, window and block size
of `--preset`, and prints where blockwise starts to win: the data behind
`ops.backends.BLOCKWISE_MIN_KEYS`, the length at which `attention_backend="auto"` switches.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import sys

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from t5gemma2_jax.ops.backends import attend
from t5gemma2_jax.ops.masks import MaskInfo, bidirectional_window


def _timed(fn, *args, reps=3):
    """Best of `reps` runs after a compiling one."""
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

    if a.context <= 1:
        return _timed(fwd_bwd, q, k, v)
    # The sequence split over `--context` devices, as the encoder runs under mesh.context.
    import contextlib

    from t5gemma2_jax.sharding import axis_rules, length_of
    from t5gemma2_jax.parallel import MeshConfig
    from t5gemma2_jax.parallel import make_mesh, sharding_rules

    mcfg = MeshConfig(data=1, fsdp=1, context=a.context, tensor=1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(make_mesh(mcfg, jax.devices()[: a.context])))
        stack.enter_context(axis_rules(sharding_rules(mcfg)))
        stack.enter_context(length_of("encoder_length"))
        return _timed(fwd_bwd, q, k, v)


def _sweep_inputs(L, kind, a):
    """(q, k, v, mask) of one row for `kind` at length L (decoder: L encoder keys after the self keys)."""
    B, H, K, d = a.batch, a.heads, a.kv_heads, a.head_dim
    T = a.decoder_length if kind == "decoder" else L
    S = T + L if kind == "decoder" else L
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, d)), a.dtype)
    k = jnp.asarray(rng.normal(size=(B, S, K, d)), a.dtype)
    v = jnp.asarray(rng.normal(size=(B, S, K, d)), a.dtype)
    pos = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))   # noqa: E731
    if kind == "decoder":
        kv_pos = jnp.concatenate([pos(T), jnp.zeros((B, L), jnp.int32)], 1)
        mask = MaskInfo(jnp.ones((B, T), jnp.int32), pos(T), jnp.ones((B, S), jnp.int32), kv_pos, causal=True,
                        cross_start=T)
    else:
        window = bidirectional_window(a.window) if kind == "local" else None
        mask = MaskInfo(jnp.ones((B, L), jnp.int32), pos(L), jnp.ones((B, L), jnp.int32), pos(L), window=window)
    return q, k, v, mask


def sweep(a) -> list[dict]:
    """Dense and blockwise at each length, forward and forward + backward, timed side by side."""
    rows = []
    for kind in a.kinds:
        for L in a.lengths:
            q, k, v, mask = _sweep_inputs(L, kind, a)
            for mode in ("fwd", "fwd+bwd"):
                t = {}
                for backend in ("dense", "blockwise"):
                    f = lambda q, k, v, backend=backend: attend(q, k, v, mask, scale=a.head_dim ** -0.5,  # noqa: E731
                                                                 backend=backend, block_size=a.block)
                    if mode == "fwd":
                        fn = jax.jit(f)
                    else:
                        fn = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                    t[backend] = _timed(fn, q, k, v, reps=a.reps)
                rows.append(dict(kind=kind, length=L, queries=q.shape[1], keys=k.shape[1], mode=mode,
                                 dense=t["dense"], blockwise=t["blockwise"]))
                print(f"{kind:7s} L={L:6d} ({q.shape[1]} x {k.shape[1]}) {mode:7s}: dense {t['dense'] * 1e3:9.1f} ms  "
                      f"blockwise {t['blockwise'] * 1e3:9.1f} ms  dense/blockwise {t['dense'] / t['blockwise']:5.2f}",
                      flush=True)
    for kind in a.kinds:
        for mode in ("fwd", "fwd+bwd"):
            mine = sorted((r["length"], r["blockwise"] < r["dense"]) for r in rows if (r["kind"], r["mode"]) == (kind, mode))
            # The shortest length from which blockwise wins at every longer length of the sweep.
            start = next((L for i, (L, _) in enumerate(mine) if all(w for _, w in mine[i:])), None)
            print(f"{kind:7s} {mode:7s}: blockwise faster from L = {start or 'never (in this sweep)'}")
    return rows


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
    p.add_argument("--sweep", action="store_true", help="dense against blockwise per length, fwd and fwd+bwd")
    p.add_argument("--preset", help="take heads, KV heads, head dim, window and block size from this preset")
    p.add_argument("--kinds", nargs="+", default=["local", "global", "decoder"], choices=["local", "global", "decoder"])
    p.add_argument("--decoder-length", type=int, default=256, help="self keys of the decoder kind (--sweep)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["blockwise", "dense"], help="timed backends (not --sweep)")
    p.add_argument("--context", type=int, default=1,
                   help="split the sequence over this many devices (mesh.context; on CPU run with "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    a = p.parse_args(argv)
    if a.context > len(jax.devices()):
        raise SystemExit(f"error: --context {a.context} needs that many devices, there are {len(jax.devices())}")
    if a.preset:
        from t5gemma2_jax.config import preset

        cfg = preset(a.preset)
        t = cfg.encoder
        a.heads, a.kv_heads, a.head_dim, a.window, a.block = (t.num_heads, t.num_kv_heads, t.head_dim,
                                                             t.sliding_window, cfg.attention_block_size)
    if a.sweep:
        rows = sweep(a)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(dict(args=vars(a), rows=rows)) + "\n")
        return 0
    rows = []
    for kind in [k for k in a.kinds if k in ("local", "global")]:
        for backend in a.backends:
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

#!/usr/bin/env python
"""A plain forward call of the model against the same forward under jax.jit, side by side.

    python scripts/benchmark_calls.py --preset 270m-270m --encoder-length 512 --decoder-length 128 --batch 2

Random weights (text only). For each attention backend in `--backends` (default: the config's
default), three ways to run `model(input_ids, decoder_input_ids)`, timed in the same process
(and with `--vs-hf`, transformers' eager PyTorch forward of the same config and shapes):

- `plain`: the call as the README writes it (compiled on first use, then reused per shape);
- `jit`: the user's own `jax.jit` over `nnx.split` state, the reference for compiled speed;
- `op-by-op`: the same call with the compiled dispatch bypassed (what a plain call used to cost).

Each: the first call (compilation included) and the median of `--reps` calls after it.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import contextlib
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.model import T5Gemma2


@contextlib.contextmanager
def op_by_op():
    """The model's public methods without their compiled dispatch (the traced code, run eagerly)."""
    saved = {name: getattr(T5Gemma2, name) for name in ("__call__", "encode", "decode")}
    try:
        for name, method in saved.items():
            setattr(T5Gemma2, name, method.__wrapped__)
        yield
    finally:
        for name, method in saved.items():
            setattr(T5Gemma2, name, method)


def _time(fn, reps: int) -> tuple[float, float]:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def _hf_forward(cfg, ids: np.ndarray, dids: np.ndarray, reps: int) -> dict:
    """transformers' eager forward (PyTorch, `sdpa` attention, no gradients) on the same shapes."""
    import torch
    from t5gemma2_jax.checkpoints.hf_config import transformers_model

    hf = transformers_model(cfg, dtype=jnp.dtype(cfg.dtype).name).eval()
    x, y = torch.tensor(ids, dtype=torch.long), torch.tensor(dids, dtype=torch.long)

    def call():
        with torch.no_grad():
            return hf(input_ids=x, decoder_input_ids=y).logits

    first, median = _time(call, reps)
    return dict(first=first, median=median)


def run(a, backend: str) -> list[dict]:
    cfg = tg.preset(a.preset, with_vision=False, dtype=a.dtype, attention_backend=backend)
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(7, cfg.vocab_size, (a.batch, a.encoder_length)), jnp.int32)
    dids = jnp.asarray(rng.integers(7, cfg.vocab_size, (a.batch, a.decoder_length)), jnp.int32)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y).logits)
    ways = {"plain": lambda: model(ids, dids).logits, "jit": lambda: jitted(state, ids, dids)}
    rows = []
    for way, fn in ways.items():
        if way in a.ways:
            first, median = _time(fn, a.reps)
            rows.append(dict(backend=backend, way=way, first=first, median=median))
    if a.vs_hf:
        rows.append(dict(backend="transformers", way="eager", **_hf_forward(cfg, np.asarray(ids), np.asarray(dids),
                                                                           a.reps)))
    if "op-by-op" in a.ways:
        with op_by_op():
            first, median = _time(lambda: model(ids, dids).logits, a.reps)
        rows.append(dict(backend=backend, way="op-by-op", first=first, median=median))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--encoder-length", type=int, default=512)
    p.add_argument("--decoder-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backends", nargs="+", default=[tg.T5Gemma2Config.__dataclass_fields__["attention_backend"].default])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ways", nargs="+", default=["plain", "jit", "op-by-op"], choices=["plain", "jit", "op-by-op"])
    p.add_argument("--vs-hf", action="store_true",
                   help="also time transformers' eager forward (PyTorch, sdpa) on the same shapes")
    p.add_argument("--json")
    a = p.parse_args(argv)
    print(f"{a.preset}, batch {a.batch}, encoder {a.encoder_length}, decoder {a.decoder_length}, {a.dtype}, "
          f"{jax.devices()[0].platform} ({jax.device_count()} devices)", flush=True)
    rows = []
    for backend in a.backends:
        mine = run(a, backend)
        rows += mine
        jit = next((r["median"] for r in mine if r["way"] == "jit"), None)
        plain = next((r["median"] for r in mine if r["way"] == "plain"), None)
        for r in mine:
            against = f" ({r['median'] / jit:5.2f} x jit)" if jit else ""
            if r["backend"] == "transformers" and plain:
                against += f" -> the plain call is {r['median'] / plain:.2f}x faster"
            print(f"{r['backend']:12s} {r['way']:8s}: first call {r['first']:8.3f} s, then {r['median'] * 1e3:9.1f} ms"
                  + against, flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(dict(args=vars(a), rows=rows)) + "\n")
    return 0


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

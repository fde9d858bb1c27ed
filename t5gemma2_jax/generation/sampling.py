"""Choosing the next token: greedy, and logit processing for sampling in Hugging Face's order
(temperature, top-k, top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def greedy(logits: jax.Array) -> jax.Array:
    """`[B]` int32: each row's first index of its largest logit, as `argmax`. Through `lax.top_k`,
    which XLA:CPU runs several times faster than `argmax` over a 262k vocabulary
    (docs/benchmarks_archive.md has the figure)."""
    return jax.lax.top_k(logits, 1)[1][:, 0].astype(jnp.int32)


def process_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> jax.Array:
    """`[B, V]` float32 logits with filtered-out tokens at -inf."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before >= top_p          # the most likely token always survives
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, NEG_INF, logits)
    return logits


def next_token(logits: jax.Array, key: jax.Array | None, *, method: str, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(`[B]` int32 next tokens, the `[B, V]` logits they were chosen from) for `logits` after the
    controls: greedy, or a draw with `key` after temperature, top-k and top-p. The one choice of the
    next token for `generate` and `generate_stream`."""
    if method == "greedy":
        return greedy(logits), logits
    chosen_from = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, chosen_from, axis=-1).astype(jnp.int32), chosen_from


def check_options(method: str, methods: tuple[str, ...], *, max_new_tokens, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, num_beams: int = 1) -> None:
    """ValueError naming the first generation option out of range."""
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if method == "sample" and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if method == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")

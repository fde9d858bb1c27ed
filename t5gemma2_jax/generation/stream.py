"""Token-by-token generation for interactive use: yields each step's tokens as they are chosen.

`generate` runs the whole loop on the device; this runs the same compiled encode and decode step
from Python so a CLI can print tokens as they come. Greedy and sampling only. The decoder's
weights are sliced out of their scanned stack once, by the first program (`loop_block_states`).
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax.generation.controls import LogitControls, initial_seen, make_controls, mark_seen
from t5gemma2_jax.generation.loop import loop_block_states
from t5gemma2_jax.generation.sampling import check_options, next_token


@functools.lru_cache(maxsize=8)
def _functions(graphdef, max_new_tokens: int, method: str, temperature: float, top_k, top_p,
               controls: LogitControls):
    @jax.jit
    def start(state, ids, mask, pixel_values, image_mask):
        model = nnx.merge(graphdef, state)
        enc, seg = model.encode(ids, mask, pixel_values=pixel_values, image_mask=image_mask)
        return model.init_cache(enc, seg, max_new_tokens), loop_block_states(model)

    @jax.jit
    def step(state, blocks, cache, last, key, t, seen):
        model = nnx.merge(graphdef, state)
        layers = None if blocks is None else model.decoder.stack.decode_layers(blocks)
        logits, cache = model.decode_step(last, cache, layers)
        logits = controls.apply(logits.astype(jnp.float32), t, seen)
        nxt, _ = next_token(logits, key, method=method, temperature=temperature, top_k=top_k, top_p=top_p)
        return nxt, cache, mark_seen(seen, nxt)

    return start, step


def generate_stream(model, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int = 64,
                    method: str = "greedy", temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, rng: int = 0, image_mask=None,
                    suppress_tokens: Sequence[int] | None = None, min_new_tokens: int = 0,
                    repetition_penalty: float = 1.0) -> Iterator[np.ndarray]:
    """Yield `[B]` token ids per step until every row has emitted eos or `max_new_tokens` is reached.
    Rows that already finished yield pad. The controls are `generate`'s."""
    check_options(method, ("greedy", "sample"), max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p)
    cfg = model.config
    controls = make_controls(vocab_size=cfg.vocab_size, eos_id=cfg.eos_token_id, suppress_tokens=suppress_tokens,
                             min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    graphdef, state = nnx.split(model)
    start, step = _functions(graphdef, max_new_tokens, method, float(temperature), top_k, top_p, controls)
    cache, blocks = start(state, ids, mask, None if pixel_values is None else jnp.asarray(pixel_values),
                          None if image_mask is None else jnp.asarray(image_mask, bool))
    last = jnp.full((ids.shape[0],), cfg.bos_token_id, jnp.int32)
    done = np.zeros(ids.shape[0], bool)
    seen = initial_seen(ids.shape[0], cfg.vocab_size, cfg.bos_token_id, controls)
    key = jax.random.key(rng)
    for t in range(max_new_tokens):
        key, sub = jax.random.split(key)
        last, cache, seen = step(state, blocks, cache, last, sub, jnp.int32(t), seen)
        tokens = np.where(done, cfg.pad_token_id, np.asarray(last))
        done |= tokens == cfg.eos_token_id
        yield tokens
        if done.all():
            return

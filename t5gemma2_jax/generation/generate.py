"""`generate`: encode once, then decode token by token from a cache inside one compiled loop.

Per decoder layer the encoder keys/values are computed once (`Model.init_cache`); local layers keep
a ring buffer of `sliding_window` self slots, global layers one slot per generated position. All
shapes are static: the loop is a `lax.while_loop` that stops early once every row has emitted eos,
and rows that finished early are padded with pad. Greedy decoding without scores of a float32
model with a large vocabulary on CPU reads the head through a bfloat16 screen whose answer is
certified or recomputed (`generation.head`): the same tokens at half the head's bytes.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax.generation.beam import beam_search
from t5gemma2_jax.generation.controls import initial_seen, make_controls, mark_seen
from t5gemma2_jax.generation.head import screen, screened_greedy
from t5gemma2_jax.generation.loop import loop_layers
from t5gemma2_jax.generation.sampling import check_options, next_token

METHODS = ("greedy", "sample", "beam")


def generate(model, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int = 32,
             method: str = "greedy", temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, num_beams: int = 4, length_penalty: float = 1.0,
             rng: jax.Array | int | None = None, image_mask=None, eos_id: int | None = None,
             pad_id: int | None = None, decoder_start_id: int | None = None, return_scores: bool = False,
             suppress_tokens: Sequence[int] | None = None, min_new_tokens: int = 0,
             repetition_penalty: float = 1.0):
    """New token ids `[B, max_new_tokens]` (pad after eos); with `return_scores=True` also the
    float32 logits `[B, max_new_tokens, V]` each step chose from (after the controls, then
    temperature/top-k/top-p when sampling; for beam search the chosen beam's log-probabilities).

    Controls (all methods): `suppress_tokens` never come out; eos cannot come before
    `min_new_tokens` new tokens; `repetition_penalty` divides (positive) or multiplies (negative)
    the logits of every decoder id so far in the row, as transformers does (for beam search, the
    log-probabilities, as there).
    """
    cfg = model.config
    check_options(method, METHODS, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, num_beams=num_beams)
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, length>0], got {input_ids.shape}")
    mask = np.ones_like(input_ids, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, expected {input_ids.shape}")
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values, np.float32)
        if image_mask is not None:
            image_mask = np.asarray(image_mask, bool)
        elif pixel_values.ndim == 5:
            image_mask = np.ones(pixel_values.shape[:2], bool)
        model.check_image_inputs(input_ids, pixel_values, image_mask)
    eos_id = cfg.eos_token_id if eos_id is None else int(eos_id)
    controls = make_controls(vocab_size=cfg.vocab_size, eos_id=eos_id, suppress_tokens=suppress_tokens,
                             min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    if rng is None:
        rng = jax.random.key(0)
    elif isinstance(rng, int):
        rng = jax.random.key(rng)
    options = dict(
        method=method, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
        top_p=top_p, num_beams=int(num_beams), length_penalty=float(length_penalty),
        eos_id=eos_id, controls=controls,
        pad_id=cfg.pad_token_id if pad_id is None else int(pad_id),
        start_id=cfg.bos_token_id if decoder_start_id is None else int(decoder_start_id),
        return_scores=return_scores)
    graphdef, state = nnx.split(model)
    fn = _compiled(graphdef, tuple(sorted(options.items())))
    tokens, scores = fn(state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask), 
                        None if pixel_values is None else jnp.asarray(pixel_values),
                        None if image_mask is None else jnp.asarray(image_mask, bool), rng)
    return (tokens, scores) if return_scores else tokens


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, options: tuple):
    o = dict(options)

    @jax.jit
    def run(state, input_ids, mask, pixel_values, image_mask, rng):
        model = nnx.merge(graphdef, state)
        enc, enc_seg = model.encode(input_ids, mask, pixel_values=pixel_values, image_mask=image_mask)
        if o["method"] == "beam":
            return beam_search(model, enc, enc_seg, num_beams=o["num_beams"], max_new_tokens=o["max_new_tokens"],
                               start_id=o["start_id"], eos_id=o["eos_id"], pad_id=o["pad_id"],
                               length_penalty=o["length_penalty"], return_scores=o["return_scores"],
                               controls=o["controls"])
        return _decode_loop(model, enc, enc_seg, rng, o)

    return run


def _decode_loop(model, enc, enc_seg, rng, o):
    B, N = enc.shape[0], o["max_new_tokens"]
    V = model.config.vocab_size
    cache = model.init_cache(enc, enc_seg, N)
    tokens = jnp.full((B, N), o["pad_id"], jnp.int32)
    scores = jnp.zeros((B, N, V) if o["return_scores"] else (0,), jnp.float32)
    controls = o["controls"]
    seen = initial_seen(B, V, o["start_id"], controls)
    layers = loop_layers(model)
    screened = screen(model) if o["method"] == "greedy" and not o["return_scores"] else None
    carry = (jnp.zeros((), jnp.int32), jnp.full((B,), o["start_id"], jnp.int32), jnp.zeros((B,), bool),
             cache, tokens, scores, rng, seen)

    def cond(c):
        t, _, done, *_ = c
        return (t < N) & ~jnp.all(done)

    def body(c):
        t, last, done, cache, tokens, scores, rng, seen = c
        if screened is not None:
            hidden, cache = model.decode_hidden(last, cache, layers)
            nxt = screened_greedy(model, hidden, screened, controls, t, seen)
            nxt = jnp.where(done, o["pad_id"], nxt)
            tokens = tokens.at[:, t].set(nxt)
            return t + 1, nxt, done | (nxt == o["eos_id"]), cache, tokens, scores, rng, mark_seen(seen, nxt)
        logits, cache = model.decode_step(last, cache, layers)
        logits = controls.apply(logits.astype(jnp.float32), t, seen)
        key = None
        if o["method"] != "greedy":
            rng, key = jax.random.split(rng)
        nxt, chosen_from = next_token(logits, key, method=o["method"], temperature=o["temperature"],
                                      top_k=o["top_k"], top_p=o["top_p"])
        nxt = jnp.where(done, o["pad_id"], nxt)
        tokens = tokens.at[:, t].set(nxt)
        if o["return_scores"]:
            scores = scores.at[:, t].set(chosen_from)
        return t + 1, nxt, done | (nxt == o["eos_id"]), cache, tokens, scores, rng, mark_seen(seen, nxt)

    _, _, _, _, tokens, scores, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, scores

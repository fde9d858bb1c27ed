"""Beam search over the cached decoder.

Each step extends every live beam, ranks the `2·num_beams` best continuations of each row, moves
those ending in eos *and ranked within the top num_beams* to the row's finished pool (score =
sum log-prob / length**length_penalty), and keeps the best num_beams others alive. A row stops
once it holds num_beams finished hypotheses (early stopping), so num_beams=1 is exactly greedy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5gemma2_jax.generation.controls import LogitControls, initial_seen, mark_seen
from t5gemma2_jax.generation.loop import loop_layers

_NEG = -1e30


def _repeat(x: jax.Array, n: int) -> jax.Array:
    return jnp.repeat(x, n, axis=0)


def _reorder(cache: dict, flat_index: jax.Array) -> dict:
    """Gather the batch rows of every layer's cache."""
    return {**cache, "layers": jax.tree.map(lambda a: jnp.take(a, flat_index, axis=0), cache["layers"])}


def beam_search(model, enc, enc_seg, *, num_beams: int, max_new_tokens: int, start_id: int, eos_id: int,
                pad_id: int, length_penalty: float = 1.0, return_scores: bool = False,
                controls: LogitControls = LogitControls()):
    B, nb, N = enc.shape[0], num_beams, max_new_tokens
    V = model.config.vocab_size
    cache = model.init_cache(_repeat(enc, nb), _repeat(enc_seg, nb), N)
    alive_seq = jnp.full((B, nb, N), pad_id, jnp.int32)
    alive_logp = jnp.tile(jnp.array([0.0] + [_NEG] * (nb - 1), jnp.float32), (B, 1))
    fin_seq = jnp.full((B, nb, N), pad_id, jnp.int32)
    fin_score = jnp.full((B, nb), _NEG, jnp.float32)
    score_shape = (B, nb, N, V) if return_scores else (0,)
    alive_scores = jnp.zeros(score_shape, jnp.float32)
    fin_scores = jnp.zeros(score_shape, jnp.float32)
    last = jnp.full((B * nb,), start_id, jnp.int32)
    rows = jnp.arange(B)[:, None]
    seen = initial_seen(B * nb, V, start_id, controls)
    layers = loop_layers(model)

    def row_done(fin_score):
        return jnp.sum(fin_score > _NEG / 2, axis=-1) >= nb

    def cond(c):
        t, *_, fin_score, _, _ = c
        return (t < N) & ~jnp.all(row_done(fin_score))

    def body(c):
        t, last, cache, alive_seq, alive_logp, alive_scores, fin_seq, fin_score, fin_scores, seen = c
        logits, cache = model.decode_step(last, cache, layers)
        # transformers applies its processors to the log-probabilities in beam search
        logp = controls.apply(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), t, seen).reshape(B, nb, V)
        cand = (alive_logp[..., None] + logp).reshape(B, nb * V)
        top_val, top_idx = jax.lax.top_k(cand, 2 * nb)                  # [B, 2nb], best first
        parent, token = top_idx // V, (top_idx % V).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seq, parent[..., None], axis=1).at[:, :, t].set(token)
        is_eos = token == eos_id
        done = row_done(fin_score)
        # finished pool: eos continuations ranked within the top nb, for rows still searching
        rank_ok = jnp.arange(2 * nb)[None, :] < nb
        new_fin = jnp.where(is_eos & rank_ok & ~done[:, None],
                            top_val / (jnp.float32(t + 1) ** length_penalty), _NEG)
        pool_score = jnp.concatenate([fin_score, new_fin], axis=1)
        keep_score, keep = jax.lax.top_k(pool_score, nb)
        fin_seq = jnp.take_along_axis(jnp.concatenate([fin_seq, seqs], axis=1), keep[..., None], axis=1)
        # alive: the best nb non-eos continuations
        alive_val, alive_pick = jax.lax.top_k(jnp.where(is_eos, _NEG, top_val), nb)
        new_parent = jnp.take_along_axis(parent, alive_pick, axis=1)
        alive_seq = jnp.take_along_axis(seqs, alive_pick[..., None], axis=1)
        if return_scores:
            step_scores = jnp.take_along_axis(alive_scores, parent[..., None, None], axis=1)
            step_scores = step_scores.at[:, :, t].set(jnp.take_along_axis(logp, parent[..., None], axis=1))
            fin_scores = jnp.take_along_axis(jnp.concatenate([fin_scores, step_scores], axis=1),
                                             keep[..., None, None], axis=1)
            alive_scores = jnp.take_along_axis(step_scores, alive_pick[..., None, None], axis=1)
        flat_parent = (rows * nb + new_parent).reshape(-1)
        cache = _reorder(cache, flat_parent)
        last = jnp.take_along_axis(token, alive_pick, axis=1).reshape(-1)
        seen = mark_seen(None if seen is None else jnp.take(seen, flat_parent, axis=0), last)
        return (t + 1, last, cache, alive_seq, alive_val, alive_scores, fin_seq, keep_score, fin_scores, seen)

    carry = (jnp.zeros((), jnp.int32), last, cache, alive_seq, alive_logp, alive_scores, fin_seq, fin_score,
             fin_scores, seen)
    t, _, _, alive_seq, alive_logp, alive_scores, fin_seq, fin_score, fin_scores, _ = jax.lax.while_loop(cond, body, carry)
    # Rows that never finished num_beams hypotheses also consider their live beams.
    alive_norm = alive_logp / (t.astype(jnp.float32) ** length_penalty)
    all_score = jnp.concatenate([fin_score, jnp.where(row_done(fin_score)[:, None], _NEG, alive_norm)], axis=1)
    best = jnp.argmax(all_score, axis=1)
    tokens = jnp.concatenate([fin_seq, alive_seq], axis=1)[jnp.arange(B), best]
    scores = jnp.concatenate([fin_scores, alive_scores], axis=1)[jnp.arange(B), best] if return_scores else alive_scores
    return tokens, scores

"""Log-likelihood of given targets (evaluation scripts, ranking, perplexity)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5gemma2_jax.data.prompts import pad_prompts
from t5gemma2_jax.losses import shift_right
from t5gemma2_jax.model import compile_on_first_use


@compile_on_first_use
def score(model, input_ids, targets, attention_mask=None, target_mask=None, pixel_values=None, *,
          image_mask=None, per_token: bool = False):
    """Sum over target tokens of log p(target | input, earlier targets), per row `[B]`
    (or `[B, T]` per token with `per_token=True`). `target_mask` (0/1) drops padding targets.
    Targets should end with eos when the score is meant to include stopping. Compiled once per
    shape when called with concrete arrays (`model.compile_on_first_use`)."""
    token_logp, _ = _target_logp(model, input_ids, targets, attention_mask, target_mask, pixel_values, image_mask)
    return token_logp if per_token else token_logp.sum(-1)


@compile_on_first_use
def score_continuations(model, input_ids, targets, attention_mask=None, target_mask=None):
    """What lm-evaluation-harness' `loglikelihood` asks of a continuation: `score`'s summed
    log-likelihood `[B]` and `[B]` whether greedy decoding would produce it (each teacher-forced
    step's argmax is its target token), as its seq2seq models answer."""
    token_logp, logp = _target_logp(model, input_ids, targets, attention_mask, target_mask, None, None)
    hit = jnp.argmax(logp, axis=-1) == jnp.asarray(targets, jnp.int32)
    if target_mask is not None:
        hit = hit | (jnp.asarray(target_mask) == 0)
    return token_logp.sum(-1), jnp.all(hit, axis=-1)


def _target_logp(model, input_ids, targets, attention_mask, target_mask, pixel_values, image_mask):
    """(per-token log-likelihoods `[B, T]`, zero at masked targets; the float32 log-softmax `[B, T, V]`)."""
    targets = jnp.asarray(targets, jnp.int32)
    dec_in = shift_right(targets, model.config.bos_token_id, model.config.pad_token_id)
    logits = model(input_ids, dec_in, attention_mask, target_mask, pixel_values, image_mask=image_mask).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if target_mask is not None:
        token_logp = token_logp * jnp.asarray(target_mask, jnp.float32)
    return token_logp, logp


def score_candidates(model, prompts: Sequence[np.ndarray], candidates: Sequence[Sequence[np.ndarray]], *,
                     batch_size: int = 64) -> list[np.ndarray]:
    """For each encoded prompt, the summed log-likelihood of each of its candidate targets
    (token ids, no eos: a candidate is scored as a continuation, not as the whole output).
    Rows go in batches of one shape (the last padded with copies), so one program serves all."""
    if len(prompts) != len(candidates):
        raise ValueError(f"score_candidates: {len(prompts)} prompts but {len(candidates)} candidate lists")
    pairs = [(i, c) for i, cands in enumerate(candidates) for c in cands]
    if not pairs:
        raise ValueError("score_candidates: no candidates")
    if any(len(c) == 0 for _, c in pairs):
        raise ValueError("score_candidates: an empty candidate")
    cfg = model.config
    ids, mask = pad_prompts([prompts[i] for i, _ in pairs], cfg.pad_token_id)
    targets, target_mask = pad_prompts([c for _, c in pairs], cfg.pad_token_id)
    size = min(batch_size, len(pairs))
    out = []
    for lo in range(0, len(pairs), size):
        rows = np.arange(lo, lo + size)
        rows[rows >= len(pairs)] = lo
        ll = np.asarray(score(model, ids[rows], targets[rows], mask[rows], target_mask[rows]))
        out.append(ll[: min(size, len(pairs) - lo)])
    flat = np.concatenate(out)
    bounds = np.cumsum([0] + [len(c) for c in candidates])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

"""Log-likelihood of given targets (evaluation scripts, ranking, perplexity)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5gemma2_jax.losses import shift_right


def score(model, input_ids, targets, attention_mask=None, target_mask=None, pixel_values=None, *,
          image_mask=None, per_token: bool = False):
    """Sum over target tokens of log p(target | input, earlier targets), per row `[B]`
    (or `[B, T]` per token with `per_token=True`). `target_mask` (0/1) drops padding targets.
    Targets should end with eos when the score is meant to include stopping."""
    targets = jnp.asarray(targets, jnp.int32)
    dec_in = shift_right(targets, model.config.bos_token_id, model.config.pad_token_id)
    logits = model(input_ids, dec_in, attention_mask, target_mask, pixel_values, image_mask=image_mask).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if target_mask is not None:
        token_logp = token_logp * jnp.asarray(target_mask, jnp.float32)
    return token_logp if per_token else token_logp.sum(-1)

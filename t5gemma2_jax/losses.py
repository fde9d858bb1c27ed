"""Token losses in float32."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                  z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights); logits `[B, T, V]` upcast to float32.

    `z_loss` adds `z_loss * logsumexp(logits)^2` per token (PaLM's stabiliser; 0 disables it).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = lse - target_logit
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    w = jnp.ones_like(loss) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(loss * w), jnp.sum(w)


def masked_lm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy over labels != ignore_index (Hugging Face's `labels=` loss)."""
    valid = labels != ignore_index
    total, count = cross_entropy(logits, jnp.where(valid, labels, 0), valid)
    return total / jnp.maximum(count, 1.0)


def shift_right(labels: jax.Array, start_id: int, pad_id: int = 0,
                ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Decoder inputs for `labels`: start token first, labels shifted right, ignored -> pad."""
    labels = jnp.where(labels == ignore_index, pad_id, labels)
    start = jnp.full(labels.shape[:-1] + (1,), start_id, labels.dtype)
    return jnp.concatenate([start, labels[..., :-1]], axis=-1)


def batch_loss_sums(model, batch: Mapping[str, jax.Array], z_loss: float = 0.0
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(sum of token losses incl. z-loss, (sum of cross-entropy, sum of weights)) of a packed
    batch under `model`: the one teacher-forced loss of training, its evaluation and
    `scripts/evaluate.py`."""
    images = {}
    if model.config.with_vision and "pixel_values" in batch:
        images = dict(pixel_values=batch["pixel_values"], image_mask=batch.get("image_mask"))
    logits = model(batch["encoder_input_ids"], batch["decoder_input_ids"],
                   encoder_segment_ids=batch["encoder_segment_ids"],
                   decoder_segment_ids=batch["decoder_segment_ids"],
                   encoder_positions=batch["encoder_positions"],
                   decoder_positions=batch["decoder_positions"], **images).logits
    targets, weights = batch["decoder_target_ids"], batch["decoder_loss_weights"]
    total, count = cross_entropy(logits, targets, weights, z_loss)
    ce = cross_entropy(logits, targets, weights)[0] if z_loss else total
    return total, (ce, count)

"""The reference backend: materialise the mask and the `[T, S]` scores, softmax in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5gemma2_jax.ops.masks import MASK_VALUE, MaskInfo, dense_mask


def attention(q, k, v, mask: MaskInfo, scale: float, block_size: int = 0) -> jax.Array:
    B, T, H, d = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, d)
    scores = jnp.einsum("BTKGd,BSKd->BKGTS", qg, k) * jnp.asarray(scale, q.dtype)
    allowed = dense_mask(mask)[:, None, None, :, :]
    scores = jnp.where(allowed, scores.astype(jnp.float32), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKd->BTKGd", probs, v)
    return out.reshape(B, T, H, d)

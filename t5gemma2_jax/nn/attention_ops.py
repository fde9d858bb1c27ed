"""The attention function every layer calls, and the description of its mask.

Layers never build masks themselves: they describe them with `MaskInfo` (segment ids, positions,
causal flag, window, where the cross/encoder keys start) and call `attend`. A backend is free to
materialise the mask (the dense reference below), to skip key blocks outside a window, or to hand
the description to a kernel, without touching the layers.

Mask semantics (indices are positions within a segment; ids 0 mark padding keys):
  allowed(q, k) = seg[q] == seg[k]  AND  (k is a cross key  OR  position rule(q, k))
  position rule: causal -> pos[k] <= pos[q];  window (left, right) -> -left <= pos[k]-pos[q] <= right
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Large finite negative: fully masked rows (padding queries in a window) give finite values, never NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class MaskInfo:
    q_segment_ids: jax.Array          # [B, T] int32
    q_positions: jax.Array            # [B, T] int32
    kv_segment_ids: jax.Array         # [B, S] int32 (self keys, then cross keys)
    kv_positions: jax.Array           # [B, S] int32 (ignored for cross keys)
    causal: bool = struct.field(pytree_node=False, default=False)
    window: tuple[int, int] | None = struct.field(pytree_node=False, default=None)
    # Keys at index >= cross_start are encoder keys of merged attention: segment rule only.
    cross_start: int | None = struct.field(pytree_node=False, default=None)


def bidirectional_window(window: int) -> tuple[int, int]:
    """The encoder's W-key window: left (W+1)//2 - 1 keys, right W//2 keys (asymmetric for even W)."""
    return ((window + 1) // 2 - 1, window // 2)


def causal_window(window: int) -> tuple[int, int]:
    """The decoder's window: the W most recent keys including the query itself."""
    return (window - 1, 0)


def dense_mask(m: MaskInfo) -> jax.Array:
    """Materialise the boolean mask `[B, T, S]` described by `m`."""
    allowed = m.q_segment_ids[:, :, None] == m.kv_segment_ids[:, None, :]
    delta = m.kv_positions[:, None, :] - m.q_positions[:, :, None]
    rule = jnp.ones_like(allowed)
    if m.causal:
        rule &= delta <= 0
    if m.window is not None:
        left, right = m.window
        rule &= (delta >= -left) & (delta <= right)
    if m.cross_start is not None:
        is_cross = jnp.arange(m.kv_segment_ids.shape[1]) >= m.cross_start
        rule |= is_cross[None, None, :]
    return allowed & rule


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float,
           backend: str = "dense", block_size: int = 512) -> jax.Array:
    """Multi-head attention with grouped KV heads.

    q `[B, T, H, d]`, k/v `[B, S, K, d]` with H % K == 0 (query head h uses KV head h // (H/K)).
    Returns `[B, T, H, d]` in q's dtype. Scores in the activation dtype, softmax in float32.
    """
    n_self = k.shape[1] if mask.cross_start is None else mask.cross_start
    if backend == "dense" or 0 < n_self != q.shape[1]:
        # Also cached decoding (a few queries against a cache whose slots are not the queries'
        # positions, e.g. a ring buffer): the other backends need query i aligned with self key i,
        # and at T = 1 there is no [T, S] matrix worth avoiding.
        return _dense_attention(q, k, v, mask, scale)
    if backend == "blockwise":
        from t5gemma2_jax.nn.attention_blockwise import blockwise_attention
        return blockwise_attention(q, k, v, mask, scale, block_size)
    if backend == "splash":
        from t5gemma2_jax.nn.attention_splash import splash_attention
        return splash_attention(q, k, v, mask, scale, block_size)
    if backend == "cudnn":
        from t5gemma2_jax.nn.attention_cudnn import cudnn_attention
        return cudnn_attention(q, k, v, mask, scale, block_size)
    raise ValueError(f"unknown attention backend {backend!r}")


def _dense_attention(q, k, v, mask: MaskInfo, scale: float) -> jax.Array:
    B, T, H, d = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, d)
    scores = jnp.einsum("BTKGd,BSKd->BKGTS", qg, k) * jnp.asarray(scale, q.dtype)
    allowed = dense_mask(mask)[:, None, None, :, :]
    scores = jnp.where(allowed, scores.astype(jnp.float32), _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKd->BTKGd", probs, v)
    return out.reshape(B, T, H, d)

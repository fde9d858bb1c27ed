"""GPU attention through `jax.nn.dot_product_attention` (cuDNN flash attention), with fallback.

cuDNN's fused kernel takes the T5Gemma 2 masks as they are: the boolean mask described by
`MaskInfo` (segments, causal, window, the merged [self | encoder] key axis) goes in as `mask=`, which
the kernel applies as an additive bias inside the fused softmax, so the `[B, H, T, S]` score matrix
is never written to memory. Grouped KV heads are native (query heads `N`, KV heads `K`, `N % K == 0`).

cuDNN only covers part of the space: a CUDA device, bf16/fp16 inputs, head dim a multiple of 8 and at
most 256 on Hopper or newer (128 before), even sequence lengths when gradients flow through the
masked kernel. Anything else runs on the `blockwise` backend, whose memory is also linear in the key
length; `cudnn_unsupported_reason` says why (logged once per reason and shape).

The mask itself is `[B, 1, T, S]` (cuDNN turns it into a bias of the activation dtype), so memory
still grows with T * S, 0.5 GiB per row at 16K x 16K in bf16: for very long inputs prefer blockwise.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from t5gemma2_jax.ops.backends import blockwise
from t5gemma2_jax.ops.masks import MaskInfo, dense_mask

log = logging.getLogger(__name__)

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def gpu_compute_capability() -> float | None:
    """Compute capability of the first CUDA device, or None when there is no CUDA device."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    cap = getattr(devices[0], "compute_capability", None) if devices else None
    return float(cap) if cap else None


def cudnn_unsupported_reason(q: jax.Array, k: jax.Array, compute_capability: float | None) -> str | None:
    """Why cuDNN flash attention cannot run these inputs (None when it can).

    q `[B, T, N, d]`, k `[B, S, K, d]`. `compute_capability` None means no CUDA device.
    """
    if compute_capability is None:
        return "no CUDA device"
    if q.dtype not in _CUDNN_DTYPES:
        return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16/float16)"
    d = q.shape[-1]
    d_max = 256 if compute_capability >= 9.0 else 128
    if d % 8 or d > d_max:
        return f"head dim {d} (needs a multiple of 8, at most {d_max} on compute capability {compute_capability})"
    T, S = q.shape[1], k.shape[1]
    if T % 2 or S % 2:
        return f"odd sequence length (queries {T}, keys {S}) with a mask"
    return None


@functools.lru_cache(maxsize=64)
def _log_fallback_once(reason: str, shape: tuple) -> None:
    log.info("attention_backend=cudnn: using blockwise for q %s: %s", shape, reason)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, scale: float,
              block_size: int = 512, *, implementation: str | None = "cudnn") -> jax.Array:
    """Attention for the `cudnn` backend: cuDNN when it takes these inputs, blockwise otherwise.

    `implementation="xla"` runs the same `jax.nn.dot_product_attention` call through XLA (any
    platform): the tests use it to check the arguments this module hands to cuDNN.
    """
    if implementation == "cudnn":
        reason = cudnn_unsupported_reason(q, k, gpu_compute_capability())
        if reason is not None:
            _log_fallback_once(reason, tuple(q.shape))
            return blockwise.attention(q, k, v, mask, scale, block_size)
    allowed = dense_mask(mask)[:, None, :, :]                     # [B, 1, T, S], broadcast over heads
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed, scale=scale,
                                        implementation=implementation)

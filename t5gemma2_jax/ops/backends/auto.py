"""`attention_backend="auto"`: per call, the fastest backend that is exact for its mask.

The choice is made while tracing, from static facts only (the shapes and dtype of q/k, the mask's
static fields, the block size and the platform of the devices the program is compiled for), so it
costs nothing when the program runs:

- TPU: `splash` when its kernel takes the mask and the queries fill at least one of its 128-row
  tiles (`splash.splash_unsupported_reason`);
- GPU: `cudnn` when cuDNN takes the inputs (`cudnn.cudnn_unsupported_reason`: bf16/fp16, head dim,
  even lengths) and its `[B, 1, T, S]` mask stays under `CUDNN_MAX_MASK_BYTES`;
- otherwise (CPU, and whatever the above refused): `blockwise` from `BLOCKWISE_MIN_KEYS` keys on,
  `dense` below, where the whole `[T, S]` score matrix is small and one fused XLA op is fastest.

Cached decoding never gets here: `attend` sends it to `dense` first.
"""

from __future__ import annotations

import jax

from t5gemma2_jax.ops.backends import get, target_platform
from t5gemma2_jax.ops.masks import MaskInfo

# Keys per query from which blockwise beats dense on CPU, forward and forward + backward, for the
# tiny and 270m-270m head layouts at the default block size (512): below one block of keys
# blockwise runs the dense computation plus its loop; from two blocks on its tiles win (the sweep,
# `scripts/benchmark_attention.py --sweep`, and its machine: docs/benchmarks.md, "Attention
# backends: dense against blockwise by length (CPU)").
BLOCKWISE_MIN_KEYS = 1024
# Splash tiles are 128 query rows: shorter inputs are mostly padding there.
SPLASH_MIN_QUERIES = 128
# cuDNN receives the mask as a `[B, 1, T, S]` array (a bias of the activation dtype inside):
# past this size blockwise, whose memory is linear in the key length, is the safer choice.
CUDNN_MAX_MASK_BYTES = 2**30


def choose(q: jax.Array, k: jax.Array, mask: MaskInfo, block_size: int = 512,
           platform: str | None = None) -> str:
    """The backend `auto` runs for q `[B, T, H, d]`, k `[B, S, K, d]` and `mask` on `platform`
    (default: `target_platform()`, the devices being compiled for)."""
    platform = target_platform() if platform is None else platform
    B, T = q.shape[:2]
    S = k.shape[1]
    if platform == "tpu" and T >= SPLASH_MIN_QUERIES:
        from t5gemma2_jax.ops.backends.splash import splash_unsupported_reason

        if splash_unsupported_reason(q, mask, block_size) is None:
            return "splash"
    if platform == "gpu" and B * T * S * q.dtype.itemsize <= CUDNN_MAX_MASK_BYTES:
        from t5gemma2_jax.ops.backends.cudnn import cudnn_unsupported_reason, gpu_compute_capability

        if cudnn_unsupported_reason(q, k, gpu_compute_capability()) is None:
            return "cudnn"
    return "blockwise" if S >= BLOCKWISE_MIN_KEYS else "dense"


def attention(q, k, v, mask: MaskInfo, scale: float, block_size: int = 512) -> jax.Array:
    """Same contract as `attend`: the backend `choose` names, run on these inputs."""
    return get(choose(q, k, mask, block_size))(q, k, v, mask, scale=scale, block_size=block_size)

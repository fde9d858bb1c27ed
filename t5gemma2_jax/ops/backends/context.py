"""Context parallelism: attention over a sequence split across the devices of one mesh axis.

Under `sharding.length_of("encoder_length")` with `mesh.context = c > 1`, every encoder activation
`[B, T, ...]` holds `T / c` consecutive positions per device. Attention is the one operation that
needs keys from other devices; `attention` runs it in a `shard_map` over the whole mesh (rows over
the batch axes, heads over `tensor` where they divide, the sequence over `context`) and hands each
device's queries and the keys they can see to the configured backend:

- local (windowed) layers: each device receives the `left` keys before its chunk from the
  previous device and the `right` keys after it from the next (`ppermute`, a halo exchange), so
  communication per layer is `(left + right)` keys whatever the length, and compute stays that of
  a window; the chunk must be at least as long as each side of the window;
- global layers: the keys and values are gathered along the axis (`all_gather`; one KV head on
  270m/1b makes them small beside the queries, which stay split).

Padding and packing work unchanged: segment ids and positions travel with their keys, halo keys
beyond the sequence's ends get a segment id no query has. The backward pass is JAX's transpose of
the same collectives (reverse permutes, reduce-scatters). Exactly the unsplit computation, up to
float summation order (tests/train/test_context_parallel.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from t5gemma2_jax.ops.masks import MaskInfo
from t5gemma2_jax.sharding import spec_for

_NO_SEGMENT = -1      # halo keys beyond either end of the sequence: no query has this segment id


def unsupported_reason(q: jax.Array, k: jax.Array, mask: MaskInfo, size: int) -> str | None:
    """Why this call cannot run split over `size` devices (then `attend` runs it whole, which GSPMD
    makes exact by gathering); None when it can."""
    T = q.shape[1]
    if mask.causal or mask.cross_start is not None:
        return "causal or merged (decoder) attention: its sequence is not split"
    if k.shape[1] != T:
        return f"{k.shape[1]} keys for {T} queries (not self-attention)"
    if T % size:
        return f"length {T} is not divisible by the {size} devices of the sequence axis"
    if mask.window is not None and max(mask.window) > T // size:
        return (f"window sides {mask.window} exceed the {T // size} positions per device "
                "(the halo comes from the neighbouring device only)")
    return None


def _heads_specs(q, k, mesh):
    """(batch spec entry, q heads entry, kv heads entry): rows over the batch axes; KV heads over
    the heads' mesh axis when it divides them, else (one KV head) only the query heads."""
    batch = spec_for(("activation_batch",), q.shape[:1], mesh)[0][0]
    kv_heads = spec_for((None, None, "activation_kv_heads", None), k.shape, mesh)[0][2]
    q_heads = kv_heads
    if kv_heads is None and k.shape[2] == 1:
        q_heads = spec_for((None, None, "activation_heads", None), q.shape, mesh)[0][2]
    return batch, q_heads, kv_heads


def _halo(x: jax.Array, left: int, right: int, axis: str, size: int, fill) -> jax.Array:
    """`x [B, L, ...]` with the previous device's last `left` and the next device's first `right`
    entries around it (`fill` beyond the sequence's ends)."""
    index = jax.lax.axis_index(axis)
    parts = []
    if left:
        recv = jax.lax.ppermute(x[:, -left:], axis, [(i, i + 1) for i in range(size - 1)])
        parts.append(jnp.where(index == 0, jnp.asarray(fill, x.dtype), recv))
    parts.append(x)
    if right:
        recv = jax.lax.ppermute(x[:, :right], axis, [(i + 1, i) for i in range(size - 1)])
        parts.append(jnp.where(index == size - 1, jnp.asarray(fill, x.dtype), recv))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else x


def attention(q, k, v, mask: MaskInfo, *, scale: float, block_size: int, backend: Callable, axis: str,
              size: int) -> jax.Array:
    """`attend`'s contract for q `[B, T, H, d]`, k/v `[B, T, K, d]` whose length is split over mesh
    axis `axis` of `size` devices; each device runs the `backend` function (a backend's
    `attention`) on its queries and the keys they can see."""
    mesh = jax.sharding.get_abstract_mesh()
    batch, q_heads, kv_heads = _heads_specs(q, k, mesh)
    q_spec, kv_spec, pos_spec = P(batch, axis, q_heads, None), P(batch, axis, kv_heads, None), P(batch, axis)
    window = mask.window

    def local(q, k, v, q_seg, q_pos, kv_seg, kv_pos):
        if window is None:
            gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)   # noqa: E731
            k, v, kv_seg, kv_pos = gather(k), gather(v), gather(kv_seg), gather(kv_pos)
            m = MaskInfo(q_seg, q_pos, kv_seg, kv_pos)
        else:
            left, right = window
            k, v = _halo(k, left, right, axis, size, 0), _halo(v, left, right, axis, size, 0)
            kv_seg = _halo(kv_seg, left, right, axis, size, _NO_SEGMENT)
            kv_pos = _halo(kv_pos, left, right, axis, size, 0)
            m = MaskInfo(q_seg, q_pos, kv_seg, kv_pos, window=window, kv_offset=left)
        return backend(q, k, v, m, scale=scale, block_size=block_size)

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, pos_spec, pos_spec, pos_spec, pos_spec),
                         out_specs=q_spec, check_vma=False)(
        q, k, v, mask.q_segment_ids, mask.q_positions, mask.kv_segment_ids, mask.kv_positions)

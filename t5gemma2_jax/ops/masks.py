"""The description of an attention mask, and the one rule that turns it into booleans.

Layers never build masks: they describe them with `MaskInfo` (segment ids, positions, causal flag,
window, where the cross/encoder keys start) and hand that to `attend`. Each backend evaluates the
same rule, `allowed`, on whatever tile it works on: the dense reference on the whole `[T, S]`
matrix, the blockwise backend on one (query block, key block) pair, cuDNN on a boolean mask.

Mask semantics (indices are positions within a segment; ids 0 mark padding keys):
  allowed(q, k) = seg[q] == seg[k]  AND  (k is a cross key  OR  position rule(q, k))
  position rule: causal -> pos[k] <= pos[q];  window (left, right) -> -left <= pos[k]-pos[q] <= right
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Large finite negative: fully masked rows (padding queries in a window) give finite values, never NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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
    # Where query i's own key sits: at key index i + kv_offset (context parallelism prepends a
    # halo of the neighbour's keys). Only a hint for backends that skip key blocks by index; which
    # keys are allowed is decided by segment ids and positions alone.
    kv_offset: int = struct.field(pytree_node=False, default=0)

    @property
    def num_self_keys(self) -> int:
        return self.kv_segment_ids.shape[1] if self.cross_start is None else self.cross_start


def bidirectional_window(window: int) -> tuple[int, int]:
    """The encoder's W-key window: left (W+1)//2 - 1 keys, right W//2 keys (asymmetric for even W)."""
    return ((window + 1) // 2 - 1, window // 2)


def causal_window(window: int) -> tuple[int, int]:
    """The decoder's window: the W most recent keys including the query itself."""
    return (window - 1, 0)


def allowed(q_seg, q_pos, k_seg, k_pos, *, causal: bool, window, cross_start: int | None = None,
            all_cross: bool = False) -> jax.Array:
    """Boolean `[B, T, S]` of the keys each query may see (`q_* [B, T]`, `k_* [B, S]`).

    Keys from index `cross_start` on are encoder keys of merged attention (segment rule only);
    `all_cross` says the same of every key here (a tile of encoder keys)."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    if all_cross:
        return same
    delta = k_pos[:, None, :] - q_pos[:, :, None]
    # Merged attention: the position rule holds for the self keys only, so it is built on its own
    # and OR-ed with the encoder-key columns; otherwise it narrows the segment rule directly.
    ok = same if cross_start is None else jnp.ones_like(same)
    if causal:
        ok &= delta <= 0
    if window is not None:
        left, right = window
        ok &= (delta >= -left) & (delta <= right)
    if cross_start is None:
        return ok
    ok |= (jnp.arange(k_seg.shape[1]) >= cross_start)[None, None, :]
    return same & ok


def dense_mask(m: MaskInfo) -> jax.Array:
    """Materialise the boolean mask `[B, T, S]` described by `m`."""
    return allowed(m.q_segment_ids, m.q_positions, m.kv_segment_ids, m.kv_positions,
                   causal=m.causal, window=m.window, cross_start=m.cross_start)

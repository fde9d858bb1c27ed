"""Blockwise attention with an online softmax: no `[T, S]` score or mask is ever materialised.

Queries are processed in blocks of `block` rows (`lax.map`); for each query block the keys are
visited in blocks of `block` columns (`lax.scan`) while a running max / sum / weighted-value
accumulator is kept in float32 (the flash-attention recurrence). Which key blocks are visited
depends on the mask description:

- windowed self keys (local layers): only the few blocks that can intersect the window, so time
  and memory grow linearly with sequence length;
- causal self keys (global decoder layers): every block, but blocks entirely in the future are
  skipped with `lax.cond`;
- bidirectional self keys and encoder (cross) keys: every block.

Assumption (true for unpacked and packed batches alike): within a segment, positions increase by
one per index, so a window in positions is a window in indices. Query rows whose keys are *all*
masked (possible only for padding) get unspecified finite values, as in the dense path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from t5gemma2_jax.ops.masks import MASK_VALUE, MaskInfo, allowed


def _pad_to(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
    n = x.shape[axis]
    extra = -n % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def attention(q, k, v, mask: MaskInfo, scale: float, block_size: int = 512) -> jax.Array:
    """Same contract as `attend` (q `[B,T,H,d]`, k/v `[B,S,K,d]`, `MaskInfo`)."""
    block = block_size
    B, T, H, d = q.shape
    K = k.shape[2]
    G = H // K
    S = k.shape[1]
    n_self = S if mask.cross_start is None else mask.cross_start
    bq = min(block, T)
    out_dtype = q.dtype

    # Queries: pad to whole blocks with a segment id no key has (-2).
    qp = _pad_to(q.reshape(B, T, K, G, d), 1, bq, 0)
    q_seg = _pad_to(mask.q_segment_ids, 1, bq, -2)
    q_pos = _pad_to(mask.q_positions, 1, bq, 0)
    nq = qp.shape[1] // bq

    def key_part(start, stop):
        """Keys [start, stop) padded to whole blocks (segment id -1 is never attended)."""
        n = stop - start
        bk = min(block, n)
        kk = _pad_to(k[:, start:stop], 1, bk, 0)
        vv = _pad_to(v[:, start:stop], 1, bk, 0)
        seg = _pad_to(mask.kv_segment_ids[:, start:stop], 1, bk, -1)
        pos = _pad_to(mask.kv_positions[:, start:stop], 1, bk, 0)
        nk = kk.shape[1] // bk
        split = lambda x: x.reshape((B, nk, bk) + x.shape[2:]).swapaxes(0, 1)   # noqa: E731  -> [nk, B, bk, ...]
        return split(kk), split(vv), split(seg), split(pos), bk, nk

    parts = [("self",) + key_part(0, n_self)]
    if n_self < S:
        parts.append(("cross",) + key_part(n_self, S))

    def one_query_block(i):
        qb = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1)
        qs = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
        qpos = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)
        m = jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32)
        l = jnp.zeros((B, K, G, bq), jnp.float32)
        acc = jnp.zeros((B, K, G, bq, d), jnp.float32)

        for kind, kb_all, vb_all, seg_all, pos_all, bk, nk in parts:
            is_cross = kind == "cross"

            def visit(carry, j, kb_all=kb_all, vb_all=vb_all, seg_all=seg_all, pos_all=pos_all, is_cross=is_cross):
                m, l, acc = carry
                kb, vb, ks, kpos = kb_all[j], vb_all[j], seg_all[j], pos_all[j]
                s = jnp.einsum("BqKGd,BkKd->BKGqk", qb, kb) * jnp.asarray(scale, qb.dtype)
                ok = allowed(qs, qpos, ks, kpos, causal=mask.causal, window=mask.window, all_cross=is_cross)
                s = jnp.where(ok[:, None, None], s.astype(jnp.float32), MASK_VALUE)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                l = l * corr + p.sum(-1)
                acc = acc * corr[..., None] + jnp.einsum("BKGqk,BkKd->BKGqd", p.astype(vb.dtype), vb).astype(jnp.float32)
                return m_new, l, acc

            if not is_cross and mask.window is not None:
                left, right = mask.window
                span = min(nk, math.ceil((bq + left + right) / bk) + 1)
                first = jnp.clip((i * bq + mask.kv_offset - left) // bk, 0, nk - span)
                blocks = first + jnp.arange(span)
                (m, l, acc), _ = jax.lax.scan(lambda c, j: (visit(c, j), None), (m, l, acc), blocks)
            elif not is_cross and mask.causal:
                def maybe(c, j, visit=visit, bk=bk):
                    # the block starts before this query block's last own key
                    needed = j * bk <= i * bq + mask.kv_offset + bq - 1
                    return jax.lax.cond(needed, visit, lambda c, j: c, c, j), None
                (m, l, acc), _ = jax.lax.scan(maybe, (m, l, acc), jnp.arange(nk))
            else:
                (m, l, acc), _ = jax.lax.scan(lambda c, j: (visit(c, j), None), (m, l, acc), jnp.arange(nk))

        out = acc / jnp.maximum(l, 1e-30)[..., None]                 # [B, K, G, bq, d]
        return out.transpose(0, 3, 1, 2, 4).astype(out_dtype)       # [B, bq, K, G, d]

    # Recompute each query block in the backward pass instead of storing its probabilities.
    blocks = jax.lax.map(jax.checkpoint(one_query_block), jnp.arange(nq))   # [nq, B, bq, K, G, d]
    out = blocks.swapaxes(0, 1).reshape(B, nq * bq, H, d)
    return out[:, :T]

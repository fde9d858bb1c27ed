"""Pallas splash attention (TPU) for every T5Gemma 2 mask, with lazy masks.

- encoder local layers: `LocalMask` with the asymmetric W-key window (left, right);
- encoder global layers: `FullMask`;
- decoder layers: ONE kernel over the merged key axis `[self | encoder]` with `MergedMask`
  (causal, optionally windowed, on the self part; fully visible encoder part), so the shared
  softmax normaliser never needs a log-sum-exp recombination;
- padding and packing through splash's segment ids (query and key segment ids must match).

Splash computes one KV head against its group of query heads (`make_splash_mqa`), vmapped over
batch and KV heads. Sequences are padded to whole blocks with segment ids that match nothing.
Off TPU the kernel runs in Pallas interpret mode (slow; for tests). Under a mesh the call is wrapped
in `shard_map` over the batch axes (and KV heads over 'tensor' when they divide), because GSPMD
cannot partition a Pallas kernel by itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from t5gemma2_jax.ops.backends import target_platform
from t5gemma2_jax.ops.masks import MaskInfo
from t5gemma2_jax.sharding import spec_for

_Q_PAD, _KV_PAD = -1, -2        # segment ids of padding rows/columns (never equal)


class MergedMask(sm._ComputableMask):
    """Decoder merged attention: keys [0, n_self) causal (window `left` back), keys >= n_self visible."""

    def __init__(self, shape: tuple[int, int], n_self: int, left: int | None):
        self.n_self, self.left = n_self, left

        def mask_function(q_ids, kv_ids):
            ok = kv_ids <= q_ids
            if left is not None:
                ok = ok & (kv_ids >= q_ids - left)
            return ok | (kv_ids >= n_self)

        super().__init__(shape=shape, mask_function=mask_function)

    def __eq__(self, other):
        return isinstance(other, MergedMask) and (self.shape, self.n_self, self.left) == (other.shape, other.n_self, other.left)

    def __hash__(self):
        return hash((MergedMask, self.shape, self.n_self, self.left))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _kernel(shape: tuple[int, int], kind: str, window, n_self: int | None, groups: int, bq: int, bkv: int,
            interpret: bool, offset: int = 0):
    if kind == "merged":
        base = MergedMask(shape, n_self, None if window is None else window[0])
    elif kind == "local":
        base = sm.LocalMask(shape, window, offset)
    elif kind == "causal":
        base = sm.CausalMask(shape)
    else:
        base = sm.FullMask(shape)
    # Built anew in every trace, never cached here: the kernel holds its mask's block tables as
    # arrays made by `jnp.array`, which inside a trace are that trace's values. A kernel kept
    # across traces hands one program another's tracers (a leak in the plain call; extra,
    # unaccounted inputs in an ahead-of-time compiled step). The costly part, turning the mask into
    # block tables, is numpy work that splash caches by the mask's value.
    blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    return sk.make_splash_mqa(sm.MultiHeadMask([base] * groups), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _pad(x, axis, n, value=0):
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _local_splash(q, k, v, q_seg, kv_seg, *, causal, window, cross_start, scale, block, interpret, offset=0):
    B, T, H, d = q.shape
    K = k.shape[2]
    G = H // K
    S = k.shape[1]
    bq = min(block, _round_up(T, 128))
    Tp = _round_up(T, bq)
    if cross_start is None:
        # A causal window is already (W - 1, 0); a bidirectional one is (left, right).
        kind = "local" if window is not None else ("causal" if causal else "full")
        n_self = None
        bkv = min(block, _round_up(S, 128))
        Sp = _round_up(S, bkv)
        k, v = _pad(k, 1, Sp), _pad(v, 1, Sp)
        kv_seg = _pad(kv_seg, 1, Sp, _KV_PAD)
    else:
        kind = "merged"
        n_self = Tp                              # self keys padded like the queries, so indices align
        S_cross = S - cross_start
        bkv = min(block, _round_up(Tp + S_cross, 128))
        Sp = _round_up(Tp + S_cross, bkv)
        pad_self = lambda x, val=0: _pad(x[:, :cross_start], 1, Tp, val)   # noqa: E731
        k = jnp.concatenate([pad_self(k), k[:, cross_start:]], 1)
        v = jnp.concatenate([pad_self(v), v[:, cross_start:]], 1)
        kv_seg = jnp.concatenate([pad_self(kv_seg, _KV_PAD), kv_seg[:, cross_start:]], 1)
        k, v, kv_seg = _pad(k, 1, Sp), _pad(v, 1, Sp), _pad(kv_seg, 1, Sp, _KV_PAD)
    q = _pad(q, 1, Tp)
    q_seg = _pad(q_seg, 1, Tp, _Q_PAD)
    kernel = _kernel((Tp, Sp), kind, window, n_self, G, bq, bkv, interpret, offset)
    # splash takes head-major layouts and applies no scale.
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(B, Tp, K, G, d).transpose(0, 2, 3, 1, 4)   # [B,K,G,T,d]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                                   # [B,K,S,d]

    def per_row(qr, kr, vr, qs, ks):
        seg = sk.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=seg))(qr, kr, vr)

    out = jax.vmap(per_row)(qh, kh, vh, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))    # [B,K,G,Tp,d]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, d)[:, :T]


def splash_unsupported_reason(q: jax.Array, mask: MaskInfo, block_size: int) -> str | None:
    """Why this kernel cannot run (or has not been built for) these inputs on a TPU, None when it can.

    q `[B, T, H, d]`. The masks it builds are a causal or bidirectional window, full, causal, and the
    merged mask whose self part is causal; the kernel's tiles are multiples of the 128 TPU lanes.
    """
    if block_size % 128:
        return f"block size {block_size} (splash blocks are multiples of 128)"
    if q.shape[-1] % 128:
        return f"head dim {q.shape[-1]} (not a multiple of 128)"
    window = mask.window
    if mask.causal and window is not None and window[1] != 0:
        return f"causal mask with window {window} reaching right of the query"
    if mask.cross_start not in (None, 0) and not mask.causal:
        return "merged keys whose self part is not causal"
    if mask.kv_offset and (mask.window is None or mask.causal or mask.cross_start is not None):
        return f"key offset {mask.kv_offset} outside a bidirectional window (only LocalMask takes one)"
    return None


def attention(q, k, v, mask: MaskInfo, scale: float, block_size: int = 512,
              interpret: bool | None = None) -> jax.Array:
    """Same contract as `attend`. Positions are assumed contiguous within segments (see blockwise)."""
    if interpret is None:
        interpret = target_platform() != "tpu"
    fn = functools.partial(_local_splash, causal=mask.causal, window=mask.window, cross_start=mask.cross_start,
                           scale=scale, block=block_size, interpret=interpret, offset=mask.kv_offset)
    mesh = jax.sharding.get_abstract_mesh()
    # No mesh, or already inside a shard_map over every axis (context parallelism): local arrays.
    if mesh is None or mesh.empty or mesh.are_all_axes_manual:
        return fn(q, k, v, mask.q_segment_ids, mask.kv_segment_ids)
    # Rows over the batch axes, KV heads over 'tensor' where they divide (MQA's one head cannot).
    axes = ("activation_batch", None, "activation_kv_heads", None)
    kv_spec, _ = spec_for(axes, k.shape, mesh)
    q_spec, _ = spec_for(axes, q.shape, mesh)
    qkv_spec = P(q_spec[0], None, kv_spec[2], None)
    seg_spec = P(q_spec[0], None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, mask.q_segment_ids, mask.kv_segment_ids)

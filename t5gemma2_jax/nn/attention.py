"""Gemma 3 attention: GQA, q/k RMSNorm, RoPE, and T5Gemma 2's merged self+cross attention.

The same projections serve both: in a decoder layer the encoder states go through `k`/`v` and
`k_norm` (no RoPE) and are appended to the decoder's own keys, so one softmax spans
`[decoder keys | encoder keys]`. No parameter exists for cross-attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5gemma2_jax.config import TextConfig
from t5gemma2_jax.nn.norm import RMSNorm
from t5gemma2_jax.nn.project import project
from t5gemma2_jax.nn.rope import apply_rope
from t5gemma2_jax.ops.backends import attend
from t5gemma2_jax.ops.masks import MASK_VALUE, MaskInfo, dense_mask
from t5gemma2_jax.sharding import constrain

_BTHD = ("batch", "length", "heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How a tower's layers compute, the same for each of them (none of it shapes a parameter):
    parameter and compute dtypes, the attention backend and its key block size. The model builds
    one per tower and every layer and attention takes it as it is."""

    param_dtype: Any
    dtype: Any
    backend: str
    block_size: int = 512


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, numerics: Numerics, *, kv_dim: int | None = None, rngs: nnx.Rngs):
        param_dtype = numerics.param_dtype
        D, H, K, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        Dkv = kv_dim or D           # a separate cross-attention may read a narrower/wider encoder
        init = nnx.initializers.normal(0.02)
        self.q = nnx.Param(init(rngs.params(), (D, H, d), param_dtype), logical_axes=("embed", "heads", "head_dim"))
        self.k = nnx.Param(init(rngs.params(), (Dkv, K, d), param_dtype), logical_axes=("embed", "kv_heads", "head_dim"))
        self.v = nnx.Param(init(rngs.params(), (Dkv, K, d), param_dtype), logical_axes=("embed", "kv_heads", "head_dim"))
        self.o = nnx.Param(init(rngs.params(), (H, d, D), param_dtype), logical_axes=("heads", "head_dim", "embed"))
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, logical_axes=("head_dim",))
        self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, logical_axes=("head_dim",))
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.dtype = numerics.dtype
        self.backend = numerics.backend
        self.block_size = numerics.block_size

    def project_kv(self, x: jax.Array, length: str = "length") -> tuple[jax.Array, jax.Array]:
        """Normed, un-rotated keys and values `[B, S, K, d]` of `x [B, S, D]`, their sequence
        sharded by the rule of `length` (`"encoder_keys"`: a decoder's whole encoder keys)."""
        names = ("batch", length, "kv_heads", "head_dim")
        k = project(self, "k", "BSD,DKd->BSKd", x, self.dtype)
        v = project(self, "v", "BSD,DKd->BSKd", x, self.dtype)
        k = constrain(checkpoint_name(self.k_norm(k), "key_proj"), names)
        v = constrain(checkpoint_name(v, "value_proj"), names)
        return k, v

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: MaskInfo,
                 cross_kv: tuple[jax.Array, jax.Array] | None = None, *, cache: dict | None = None,
                 slot: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """(output `[B, T, D]`, the cache with this call's keys written, or None without one).

        Without a cache, the keys are `x`'s own, followed by `cross_kv` (merged attention): `mask`
        describes `[T self keys | S encoder keys]`. With a cache (decoding a few new tokens `x`):
        `cache['k'] [B, C, K, d]` and `cache['v'] [B, K, d, C]` (values stored transposed, the
        layout the probabilities-times-values product reads without a copy) hold rotated self
        keys/values; on local layers C = window and `slot` wraps around (a ring buffer).
        `cache['ck'] [B, S, K, d]`, `cache['cv'] [B, K, d, S]` hold the encoder keys/values,
        computed once. `mask` then describes `[C cached slots | t new keys | S encoder keys]`, the
        slots about to be overwritten marked empty. The keys are attended part by part, so no part
        is copied, and the cache is updated in place after it has been read.
        """
        q = project(self, "q", "BTD,DHd->BTHd", x, self.dtype)
        q = constrain(checkpoint_name(self.q_norm(q), "query_proj"), _BTHD)
        q = apply_rope(q, sin, cos)
        k, v = self.project_kv(x)
        k = apply_rope(k, sin, cos)
        if cache is None:
            if cross_kv is not None:
                # [self | encoder] keys whole on every device: the decoder's few self keys are
                # gathered when its positions are split (context parallelism), the encoder keys
                # already are.
                whole = lambda x: constrain(x, ("batch", "encoder_keys", "kv_heads", "head_dim"))  # noqa: E731
                k = whole(jnp.concatenate([whole(k), cross_kv[0]], axis=1))
                v = whole(jnp.concatenate([whole(v), cross_kv[1]], axis=1))
            out = attend(q, k, v, mask, scale=self.scale, backend=self.backend, block_size=self.block_size)
        else:
            k = k.astype(cache["k"].dtype)
            v = jnp.transpose(v, (0, 2, 3, 1)).astype(cache["v"].dtype)                 # [B, K, d, t]
            keys, values = [cache["k"], k], [cache["v"], v]
            if "ck" in cache:       # merged attention: the encoder keys follow the self keys
                keys.append(cache["ck"])
                values.append(cache["cv"])
            out = _attend_parts(q, keys, values, mask, self.scale)
        out = checkpoint_name(constrain(out, _BTHD), "attention_out")
        y = checkpoint_name(project(self, "o", "BTHd,HdD->BTD", out, self.dtype), "out_proj")
        if cache is None:
            return y, None
        # XLA writes a buffer in place only where every read of it provably comes first: adding
        # zero times the output to the new entries makes the writes depend on the reads (no
        # value changes), else it copies each cache twice per step.
        after = y[:, :, 0].astype(k.dtype) * 0                                          # [B, t]
        kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k + after[:, :, None, None], slot, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v + after[:, None, None, :], slot, axis=3)
        return y, {**cache, "k": kc, "v": vc}

    def attend_to(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo) -> jax.Array:
        """Plain cross-attention (the T5Gemma v1-style ablation): no RoPE on either side."""
        q = self.q_norm(project(self, "q", "BTD,DHd->BTHd", x, self.dtype))
        out = attend(q, k, v, mask, scale=self.scale, backend=self.backend, block_size=self.block_size)
        return project(self, "o", "BTHd,HdD->BTD", out, self.dtype)


def _attend_parts(q: jax.Array, keys: list[jax.Array], values_t: list[jax.Array], mask: MaskInfo,
                  scale: float) -> jax.Array:
    """The dense backend's attention over the concatenation of several key/value parts, without
    concatenating them: each part's scores come from its own buffer and one softmax spans them all
    (for a decoding step's few queries the scores are small; the caches are not). Keys are
    `[B, S_i, K, d]`, values transposed `[B, K, d, S_i]`; `mask` describes the concatenation."""
    B, T, H, d = q.shape
    K = keys[0].shape[2]
    qg = q.reshape(B, T, K, H // K, d)
    s = jnp.asarray(scale, q.dtype)
    scores = jnp.concatenate([jnp.einsum("BTKGd,BSKd->BKGTS", qg, k) * s for k in keys], axis=-1)
    scores = jnp.where(dense_mask(mask)[:, None, None, :, :], scores.astype(jnp.float32), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(values_t[0].dtype)
    out, start = 0, 0
    for v in values_t:
        n = v.shape[-1]
        out = out + jnp.einsum("BKGTS,BKdS->BTKGd", probs[..., start:start + n], v)
        start += n
    return out.reshape(B, T, H, d).astype(q.dtype)

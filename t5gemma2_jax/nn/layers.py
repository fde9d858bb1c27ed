"""One transformer layer (both towers) and the per-forward context the layers share."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5gemma2_jax.config import TextConfig
from t5gemma2_jax.nn.attention import Attention, Numerics
from t5gemma2_jax.nn.mlp import MLP
from t5gemma2_jax.nn.norm import RMSNorm
from t5gemma2_jax.nn.project import kernel
from t5gemma2_jax.ops.masks import MaskInfo
from t5gemma2_jax.sharding import constrain

# How a decoder layer sees the encoder:
#   "merged"   T5Gemma 2: encoder keys appended to the self keys, one softmax, no extra parameters;
#   "separate" T5Gemma v1-style ablation: a second attention sublayer with its own parameters;
#   "none"     no encoder access (encoder layers; local decoder layers of the global-only ablation).
CROSS_MODES = ("merged", "separate", "none")


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What every layer of one tower needs, computed once per forward pass.

    `rope` is keyed by layer type ('sliding_attention' / 'full_attention'). `masks` holds, per
    layer type, the mask of the layer's main attention; for the decoder also `('self', type)`
    (self keys only) and `'cross'` (encoder keys only) for the ablation variants.
    `encoder_states` is set for the decoder: each layer turns it into its own keys/values.
    """

    rope: dict[str, tuple[jax.Array, jax.Array]]
    masks: dict
    encoder_states: jax.Array | None = None
    # Decoding only: where this step's keys go in each layer type's cache.
    slots: dict[str, jax.Array] | None = None


class Layer(nnx.Module):
    """Pre/post-normed attention and GeGLU MLP sublayers (Gemma 3's sandwich norms)."""

    def __init__(self, cfg: TextConfig, layer_type: str, numerics: Numerics, *, cross: str = "none",
                 encoder_dim: int | None = None, rngs: nnx.Rngs):
        D, eps, param_dtype = cfg.hidden_size, cfg.rms_norm_eps, numerics.param_dtype
        if cross not in CROSS_MODES:
            raise ValueError(f"cross must be one of {CROSS_MODES}, got {cross!r}")
        self.layer_type = layer_type
        self.cross = cross
        self.pre_attn_norm = RMSNorm(D, eps=eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, numerics, rngs=rngs)
        self.post_attn_norm = RMSNorm(D, eps=eps, param_dtype=param_dtype)
        if cross == "separate":
            self.pre_cross_norm = RMSNorm(D, eps=eps, param_dtype=param_dtype)
            self.cross_attn = Attention(cfg, numerics, kv_dim=encoder_dim, rngs=rngs)
            self.post_cross_norm = RMSNorm(D, eps=eps, param_dtype=param_dtype)
        self.pre_ffw_norm = RMSNorm(D, eps=eps, param_dtype=param_dtype)
        self.mlp = MLP(D, cfg.intermediate_size, param_dtype=param_dtype, dtype=numerics.dtype, rngs=rngs)
        self.post_ffw_norm = RMSNorm(D, eps=eps, param_dtype=param_dtype)

    def _self_mask(self, ctx: LayerContext) -> MaskInfo:
        """The main attention's mask: over `[self | encoder]` keys for merged layers, over the self
        keys for the decoder's other layers (the encoder's context has only its own)."""
        if self.cross == "merged" or ("self", self.layer_type) not in ctx.masks:
            return ctx.masks[self.layer_type]
        return ctx.masks[("self", self.layer_type)]

    def __call__(self, x: jax.Array, ctx: LayerContext, cache: dict | None = None) -> tuple[jax.Array, dict | None]:
        """(output, the cache with this call's keys written, or None without one). Training, scoring
        and encoding run without a cache; cached decoding (`init_cache`) feeds a few new tokens
        with one, through the same code."""
        x = checkpoint_name(constrain(x, ("batch", "length", "embed")), "layer_input")
        sin, cos = ctx.rope[self.layer_type]
        decoding = cache is not None
        cross_kv = None
        if self.cross == "merged" and not decoding:
            cross_kv = self.attn.project_kv(ctx.encoder_states, "encoder_keys")
        h, cache = self.attn(self.pre_attn_norm(x), sin, cos, self._self_mask(ctx), cross_kv, cache=cache,
                             slot=ctx.slots[self.layer_type] if decoding else None)
        x = x + self.post_attn_norm(h)
        if self.cross == "separate":
            ck, cv = ((cache["xk"], cache["xv"]) if decoding
                      else self.cross_attn.project_kv(ctx.encoder_states, "encoder_keys"))
            h = self.cross_attn.attend_to(self.pre_cross_norm(x), ck, cv, ctx.masks["cross"])
            x = x + self.post_cross_norm(h)
        h = self.mlp(self.pre_ffw_norm(x))
        return x + self.post_ffw_norm(h), cache

    # ---- cached decoding -------------------------------------------------------------------
    def init_cache(self, encoder_states: jax.Array, size: int, dtype) -> dict:
        """Empty self slots (keys `[B, size, K, d]`, values `[B, K, d, size]`) and this layer's
        encoder keys/values, computed once (see `Attention.__call__` for the layouts)."""
        B = encoder_states.shape[0]
        _, K, d = kernel(self.attn, "k").shape
        cache = {"k": jnp.zeros((B, size, K, d), dtype), "v": jnp.zeros((B, K, d, size), dtype)}
        if self.cross == "merged":
            ck, cv = self.attn.project_kv(encoder_states, "encoder_keys")
            cache["ck"], cache["cv"] = ck, jnp.transpose(cv, (0, 2, 3, 1))
        elif self.cross == "separate":
            cache["xk"], cache["xv"] = self.cross_attn.project_kv(encoder_states, "encoder_keys")
        return cache

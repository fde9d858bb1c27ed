"""One SigLIP encoder block: pre-LN multi-head self-attention and pre-LN GELU(tanh) MLP.

    x = x + out(MHA(LN1(x)))        q/k/v/out all biased, scale head_dim**-0.5, no mask
    x = x + fc2(gelu_tanh(fc1(LN2(x))))

Shapes: N images, T = S = patches, D = Dv width, H heads, K head_dim, F = Fv MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5gemma2_jax.config import VisionConfig
from t5gemma2_jax.nn.project import project
from t5gemma2_jax.sharding import constrain
from t5gemma2_jax.vision.layers import LayerNorm, fan_in_normal

_HEAD = ("vision_heads", "vision_head_dim")
# Activations share the text model's logical names: images are split over the batch axes like
# rows, so FSDP-sharded tower weights are gathered per layer instead of the images replicated.
_NTD = ("batch", "length", "embed")
_NTHK = ("batch", "length", "heads", "head_dim")
_NTF = ("batch", "length", "mlp")


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        D, H = cfg.hidden_size, cfg.num_heads
        K = D // H

        def kernel_in(key):  # [D, H, K]: input-major, heads split out of HF's [H*K, D] rows
            return nnx.Param(fan_in_normal(key, (D, H, K), D, param_dtype),
                             logical_axes=("vision_embed",) + _HEAD)

        def bias_heads():
            return nnx.Param(jnp.zeros((H, K), param_dtype), logical_axes=_HEAD)

        self.q_kernel, self.q_bias = kernel_in(rngs.params()), bias_heads()
        self.k_kernel, self.k_bias = kernel_in(rngs.params()), bias_heads()
        self.v_kernel, self.v_bias = kernel_in(rngs.params()), bias_heads()
        self.out_kernel = nnx.Param(fan_in_normal(rngs.params(), (H, K, D), D, param_dtype),
                                    logical_axes=_HEAD + ("vision_embed",))
        self.out_bias = nnx.Param(jnp.zeros((D,), param_dtype), logical_axes=("vision_embed",))
        self.scale = K ** -0.5
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype

        def proj(which: str, name: str) -> jax.Array:
            bias = getattr(self, f"{which}_bias")[...].astype(dt)
            y = project(self, f"{which}_kernel", "NTD,DHK->NTHK", x, dt) + bias
            return checkpoint_name(constrain(y, _NTHK), name)  # names of the 'save_qkv_proj' policy

        q = proj("q", "query_proj")
        k = proj("k", "key_proj")
        v = proj("v", "value_proj")
        # Scores in float32 (softmax statistics must not be bf16), probabilities back in dt.
        scores = jnp.einsum("NTHK,NSHK->NHTS", q, k, preferred_element_type=jnp.float32) * self.scale
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o = constrain(jnp.einsum("NHTS,NSHK->NTHK", probs, v), _NTHK)
        out = project(self, "out_kernel", "NTHK,HKD->NTD", o, dt) + self.out_bias[...].astype(dt)
        return checkpoint_name(constrain(out, _NTD), "out_proj")


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.fc1_kernel = nnx.Param(fan_in_normal(rngs.params(), (D, F), D, param_dtype),
                                    logical_axes=("vision_embed", "vision_mlp"))
        self.fc1_bias = nnx.Param(jnp.zeros((F,), param_dtype), logical_axes=("vision_mlp",))
        self.fc2_kernel = nnx.Param(fan_in_normal(rngs.params(), (F, D), F, param_dtype),
                                    logical_axes=("vision_mlp", "vision_embed"))
        self.fc2_bias = nnx.Param(jnp.zeros((D,), param_dtype), logical_axes=("vision_embed",))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = project(self, "fc1_kernel", "NTD,DF->NTF", x, dt) + self.fc1_bias[...].astype(dt)
        h = jax.nn.gelu(constrain(h, _NTF), approximate=True)  # HF 'gelu_pytorch_tanh'
        return project(self, "fc2_kernel", "NTF,FD->NTD", h, dt) + self.fc2_bias[...].astype(dt)


class SiglipBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attn = SiglipAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = SiglipMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, _NTD)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

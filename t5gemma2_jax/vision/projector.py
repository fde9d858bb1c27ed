"""Multi-modal projector: SigLIP patch outputs -> image soft tokens in the text embedding space.

    g     = mean over non-overlapping k x k patch blocks      [N, P*P, Dv] -> [N, t*t, Dv]
    feats = RMSNorm_{1+w}(g) @ W[Dv, D]                       -> [N, t*t, D]

with t = sqrt(mm_tokens_per_image) tokens per side and k = P // t (4 x 4 for 64 -> 16).
`W` is stored input-major, exactly as HF's `mm_input_projection_weight` (used as `x @ W`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.nn.norm import RMSNorm
from t5gemma2_jax.nn.project import project
from t5gemma2_jax.vision.layers import normal


def avg_pool_patches(x: jax.Array, patches_per_side: int, tokens_per_side: int) -> jax.Array:
    """[N, P*P, Dv] row-major patches -> [N, t*t, Dv] row-major k x k block means (HF AvgPool2d)."""
    N, _, Dv = x.shape
    P, t = patches_per_side, tokens_per_side
    k = P // t
    g = x.reshape(N, t, k, t, k, Dv)  # patch (row, col) = (ty*k + i, tx*k + j)
    # Mean in float32: a bf16 sum of 16 values loses bits the projector then amplifies.
    g = jnp.mean(g.astype(jnp.float32), axis=(2, 4))
    return g.reshape(N, t * t, Dv).astype(x.dtype)


class MultiModalProjector(nnx.Module):
    def __init__(self, config: T5Gemma2Config, *, rngs: nnx.Rngs):
        v = config.vision
        pdt = jnp.dtype(config.param_dtype)
        self.norm = RMSNorm(v.hidden_size, eps=v.layer_norm_eps, param_dtype=pdt,
                            logical_axes=("vision_embed",))
        # HF initialises this to zeros; a small random init keeps an untrained model's images
        # visible to the encoder (checkpoints overwrite it anyway).
        self.kernel = nnx.Param(normal(rngs.params(), (v.hidden_size, config.hidden_size), 0.02, pdt),
                                logical_axes=("vision_embed", "embed"))
        self.patches_per_side = v.patches_per_side
        self.tokens_per_side = math.isqrt(config.mm_tokens_per_image)
        self.dtype = jnp.dtype(config.dtype)

    def pool(self, hidden: jax.Array) -> jax.Array:
        return avg_pool_patches(hidden, self.patches_per_side, self.tokens_per_side)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """SigLIP last_hidden_state [N, P*P, Dv] -> image features [N, mm_tokens_per_image, D]."""
        g = self.norm(self.pool(hidden.astype(self.dtype)))
        return project(self, "kernel", "NTV,VD->NTD", g, self.dtype)

"""SigLIP patch embedding: non-overlapping p x p patches -> linear -> + learned position table.

HF implements the patchify as `Conv2d(C -> Dv, kernel=p, stride=p)`; with stride == kernel that is
exactly a matmul over each patch, which we write as one einsum (a plain dot on every backend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.config import VisionConfig
from t5gemma2_jax.sharding import constrain
from t5gemma2_jax.vision.layers import fan_in_normal, normal


class PatchEmbedding(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        p, C, Dv, P = cfg.patch_size, cfg.num_channels, cfg.hidden_size, cfg.patches_per_side
        # Kernel in HWIO order [p, p, C, Dv] (HF conv weight [Dv, C, p, p] transposed (2, 3, 1, 0)).
        self.kernel = nnx.Param(fan_in_normal(rngs.params(), (p, p, C, Dv), p * p * C, param_dtype),
                                logical_axes=(None, None, None, "vision_embed"))
        self.bias = nnx.Param(jnp.zeros((Dv,), param_dtype), logical_axes=("vision_embed",))
        # One learned vector per patch, row-major (index = row * P + col), as HF's position_ids.
        self.position = nnx.Param(normal(rngs.params(), (P * P, Dv), Dv ** -0.5, param_dtype),
                                  logical_axes=(None, "vision_embed"))
        self.cfg = cfg
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[N, C, H, W] (channels first, HF layout) -> [N, P*P, Dv] in the compute dtype."""
        cfg = self.cfg
        N, C, H, W = pixel_values.shape
        if (C, H, W) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values must be [N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}] "
                f"(channels first), got {tuple(pixel_values.shape)}"
            )
        p, P = cfg.patch_size, cfg.patches_per_side
        pixel_values = constrain(pixel_values, ("batch", None, None, None))
        x = pixel_values.astype(self.dtype).reshape(N, C, P, p, P, p)  # [N, C, row, i, col, j]
        x = jnp.einsum("NCYiXj,ijCD->NYXD", x, self.kernel[...].astype(self.dtype))
        x = x.reshape(N, P * P, cfg.hidden_size) + self.bias[...].astype(self.dtype)
        return constrain(x + self.position[...].astype(self.dtype), ("batch", "length", "embed"))

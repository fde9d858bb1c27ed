"""`VisionEncoder`: pixels -> image soft tokens (SigLIP tower, then pooling projector)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.vision.projector import MultiModalProjector
from t5gemma2_jax.vision.tower import SiglipTower


def _flatten_images(pixel_values: jax.Array) -> jax.Array:
    """[..., C, H, W] -> [N, C, H, W] (explicit N: a -1 cannot be inferred when N == 0)."""
    if pixel_values.ndim < 4:
        raise ValueError(f"pixel_values must be [N, C, H, W] (channels first), got {pixel_values.shape}")
    return pixel_values.reshape((math.prod(pixel_values.shape[:-3]),) + pixel_values.shape[-3:])


class VisionEncoder(nnx.Module):
    """Attributes: `tower` (SigLIP, frozen in the paper's recipe, see `VISION_PARAMS`) and
    `projector` (pool + RMSNorm + projection into the text width D)."""

    def __init__(self, config: T5Gemma2Config, *, rngs: nnx.Rngs):
        self.tower = SiglipTower(config.vision, dtype=config.dtype, param_dtype=config.param_dtype,
                                 scan_layers=config.scan_layers, remat=config.remat, rngs=rngs)
        self.projector = MultiModalProjector(config, rngs=rngs)
        self.mm_tokens_per_image = config.mm_tokens_per_image
        self.dtype = jnp.dtype(config.dtype)

    def last_hidden_state(self, pixel_values: jax.Array) -> jax.Array:
        """SigLIP output before pooling/projection: [..., C, H, W] -> [..., P*P, Dv]
        (HF `vision_tower(pixel_values).last_hidden_state`)."""
        lead = pixel_values.shape[:-3]
        h = self.tower(_flatten_images(pixel_values))
        return h.reshape(lead + h.shape[1:])

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Channels-first pixels [N, C, H, W] (or any leading dims, e.g. [B, M, C, H, W])
        -> image features [..., mm_tokens_per_image, D] in the compute dtype
        (HF `get_image_features(pixel_values).pooler_output`)."""
        lead = pixel_values.shape[:-3]
        h = self.tower(_flatten_images(pixel_values))
        f = self.projector(h).astype(self.dtype)
        return f.reshape(lead + f.shape[1:])

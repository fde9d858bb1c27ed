"""T5Gemma 2 vision model: SigLIP tower + pooling projector, image insertion, freezing filters.

Its checkpoint mapping lives in `t5gemma2_jax.checkpoints.hf_vision`, image decoding and
preprocessing in `t5gemma2_jax.data.images`."""

from t5gemma2_jax.vision.encoder import VisionEncoder
from t5gemma2_jax.vision.freeze import TRAINABLE, VISION_PARAMS
from t5gemma2_jax.vision.insert import check_image_placeholders, insert_image_features
from t5gemma2_jax.vision.projector import MultiModalProjector, avg_pool_patches
from t5gemma2_jax.vision.tower import SiglipTower

__all__ = [
    "VisionEncoder", "SiglipTower", "MultiModalProjector", "avg_pool_patches",
    "insert_image_features", "check_image_placeholders",
    "VISION_PARAMS", "TRAINABLE",
]

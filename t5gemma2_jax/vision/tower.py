"""The SigLIP vision tower (So400m/14 in the released models): patch embedding, L pre-LN blocks,
post LayerNorm. No MAP head: T5Gemma 2 uses the patch outputs (`last_hidden_state`).

With `scan_layers=True` the L blocks are one module whose parameters carry a leading 'layers'
axis, applied with `jax.lax.scan` (one compiled block, O(1) compile time in L); otherwise they are
an `nnx.List` of separate blocks. `remat` names a policy of `t5gemma2_jax.ops.scan`, the same
policies the text towers use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.config import VisionConfig
from t5gemma2_jax.ops import scan as scan_lib
from t5gemma2_jax.vision.block import SiglipBlock
from t5gemma2_jax.vision.embeddings import PatchEmbedding
from t5gemma2_jax.vision.layers import LayerNorm


class SiglipTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype="float32", param_dtype="float32", scan_layers: bool = True,
                 remat: str = "none", rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(dtype), jnp.dtype(param_dtype)
        scan_lib.remat_policy(remat)  # validate early
        self.embed = PatchEmbedding(cfg, dtype=dt, param_dtype=pdt, rngs=rngs)
        if scan_layers:
            self.blocks = scan_lib.stacked(lambda r: SiglipBlock(cfg, dtype=dt, param_dtype=pdt, rngs=r),
                                           cfg.num_layers, rngs)
        else:
            self.blocks = nnx.List(
                [SiglipBlock(cfg, dtype=dt, param_dtype=pdt, rngs=rngs) for _ in range(cfg.num_layers)]
            )
        self.post_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt)
        self.cfg = cfg
        self.scan_layers = scan_layers
        self.remat = remat

    def _blocks(self, x: jax.Array) -> jax.Array:
        if self.scan_layers:
            x, _ = scan_lib.scan(self.blocks, lambda block, h, _: (block(h), None), x, remat_name=self.remat)
            return x
        for block in self.blocks:
            x = scan_lib.call(block, lambda m, h: m(h), x, remat_name=self.remat)
        return x

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[N, C, H, W] -> last_hidden_state [N, P*P, Dv] (post-LayerNorm) in the compute dtype."""
        return self.post_norm(self._blocks(self.embed(pixel_values)))

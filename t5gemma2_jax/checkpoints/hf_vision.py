"""Hugging Face <-> ours mapping of the SigLIP tower and the multi-modal projector.

Paths are relative to a `VisionEncoder` (prefix them with the attribute that holds it, e.g.
`entry.prefixed('vision')`). Keys are the canonical transformers-5.23 names; checkpoints written by
older transformers put a `vision_model.` segment after `vision_tower.`: `normalize_vision_key` maps
those to the canonical form (and `legacy_vision_key` back, for writing that layout).

Layout conversions (HF -> ours):
    patch_embedding.weight [Dv, C, p, p]  -> embed.kernel [p, p, C, Dv]   transpose(2, 3, 1, 0)
    {q,k,v}_proj.weight [H*K, Dv] (out,in) -> attn.{q,k,v}_kernel [Dv, H, K]  .T.reshape
    {q,k,v}_proj.bias [H*K]               -> attn.{q,k,v}_bias [H, K]      reshape
    out_proj.weight [Dv, H*K]             -> attn.out_kernel [H, K, Dv]    .T.reshape
    fc1/fc2 .weight [out, in]             -> mlp.fc{1,2}_kernel [in, out]  .T
    LayerNorm weight/bias                 -> norm.scale / norm.bias        identity
    mm_input_projection_weight [Dv, D]    -> projector.kernel [Dv, D]      identity (input-major)
    mm_soft_emb_norm.weight               -> projector.norm.scale          identity (1+w form)
"""

from __future__ import annotations

import numpy as np

from t5gemma2_jax.checkpoints.hf_mapping import HFEntry, heads_bias, heads_in, heads_out, identity, transpose
from t5gemma2_jax.config import T5Gemma2Config

VISION_PREFIX = "model.encoder.vision_tower."
LEGACY_VISION_PREFIX = "model.encoder.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.encoder.multi_modal_projector."


def normalize_vision_key(hf_key: str) -> str:
    """`...vision_tower.vision_model.X` -> `...vision_tower.X`; every other key is returned as is."""
    if hf_key.startswith(LEGACY_VISION_PREFIX):
        return VISION_PREFIX + hf_key[len(LEGACY_VISION_PREFIX):]
    return hf_key


def legacy_vision_key(hf_key: str) -> str:
    """Inverse of `normalize_vision_key` for vision-tower keys (the older on-disk layout)."""
    if hf_key.startswith(VISION_PREFIX) and not hf_key.startswith(LEGACY_VISION_PREFIX):
        return LEGACY_VISION_PREFIX + hf_key[len(VISION_PREFIX):]
    return hf_key


def _conv_to_ours(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _conv_to_hf(k: np.ndarray) -> np.ndarray:
    return k.transpose(3, 2, 0, 1)


def vision_hf_entries(config: T5Gemma2Config) -> list[HFEntry]:
    """All HF tensors of the vision tower and projector, mapped onto a `VisionEncoder(config)`."""
    v = config.vision
    H, K = v.num_heads, v.hidden_size // v.num_heads
    t = VISION_PREFIX
    entries = [
        HFEntry(t + "embeddings.patch_embedding.weight", ("tower", "embed", "kernel"), None,
                _conv_to_ours, _conv_to_hf),
        HFEntry(t + "embeddings.patch_embedding.bias", ("tower", "embed", "bias")),
        HFEntry(t + "embeddings.position_embedding.weight", ("tower", "embed", "position")),
        HFEntry(t + "post_layernorm.weight", ("tower", "post_norm", "scale")),
        HFEntry(t + "post_layernorm.bias", ("tower", "post_norm", "bias")),
        HFEntry(PROJECTOR_PREFIX + "mm_input_projection_weight", ("projector", "kernel")),
        HFEntry(PROJECTOR_PREFIX + "mm_soft_emb_norm.weight", ("projector", "norm", "scale")),
    ]
    q_in, q_hf = heads_in(H, K)
    o_in, o_hf = heads_out(H, K)
    b_in, b_hf = heads_bias(H, K)
    per_layer: list[tuple[str, tuple, object, object]] = [
        ("layer_norm1.weight", ("norm1", "scale"), identity, identity),
        ("layer_norm1.bias", ("norm1", "bias"), identity, identity),
        ("layer_norm2.weight", ("norm2", "scale"), identity, identity),
        ("layer_norm2.bias", ("norm2", "bias"), identity, identity),
        ("mlp.fc1.weight", ("mlp", "fc1_kernel"), transpose, transpose),
        ("mlp.fc1.bias", ("mlp", "fc1_bias"), identity, identity),
        ("mlp.fc2.weight", ("mlp", "fc2_kernel"), transpose, transpose),
        ("mlp.fc2.bias", ("mlp", "fc2_bias"), identity, identity),
        ("self_attn.out_proj.weight", ("attn", "out_kernel"), o_in, o_hf),
        ("self_attn.out_proj.bias", ("attn", "out_bias"), identity, identity),
    ]
    for name in ("q", "k", "v"):
        per_layer.append((f"self_attn.{name}_proj.weight", ("attn", f"{name}_kernel"), q_in, q_hf))
        per_layer.append((f"self_attn.{name}_proj.bias", ("attn", f"{name}_bias"), b_in, b_hf))
    for j in range(v.num_layers):
        for suffix, sub, to_ours, to_hf in per_layer:
            key = f"{t}encoder.layers.{j}.{suffix}"
            if config.scan_layers:
                entries.append(HFEntry(key, ("tower", "blocks") + sub, j, to_ours, to_hf))
            else:
                entries.append(HFEntry(key, ("tower", "blocks", j) + sub, None, to_ours, to_hf))
    return entries

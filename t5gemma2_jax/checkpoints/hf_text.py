"""Hugging Face <-> ours mapping of the text parameters: the shared embedding and both towers.

Keys are transformers' canonical names (`model.encoder.text_model.*`, `model.decoder.*`); the
Hub's flat encoder layout is mapped onto them by `hf.canonical_key`. A scanned stack's layer `i`
is a slice of a stacked parameter (`ops.scan.layer_slot`).

Layout conversions (HF -> ours):
    {q,k,v}_proj.weight [N*d, D] (out, in) -> attn.{q,k,v} [D, N, d]
    o_proj.weight [D, H*d]                 -> attn.o [H, d, D]
    mlp.{gate,up,down}_proj.weight          -> mlp.{gate,up,down} (transposed: input-major)
    *_layernorm.weight, q/k_norm.weight     -> RMSNorm scale (stored as w, used as 1 + w)
"""

from __future__ import annotations

from t5gemma2_jax.checkpoints.hf_mapping import HFEntry, heads_in, heads_out, identity, transpose
from t5gemma2_jax.config import T5Gemma2Config, TextConfig
from t5gemma2_jax.ops.scan import layer_slot, stack_layout

ENCODER_PREFIX = "model.encoder.text_model."
DECODER_PREFIX = "model.decoder."
EMBEDDING_KEY = ENCODER_PREFIX + "embed_tokens.weight"
EOI_KEY = ENCODER_PREFIX + "embed_tokens.eoi_embedding"


def _layer_entries(c: TextConfig, hf_prefix: str, path: tuple, index: int | None) -> list[HFEntry]:
    H, K, d = c.num_heads, c.num_kv_heads, c.head_dim
    table = [
        ("self_attn.q_proj.weight", ("attn", "q"), *heads_in(H, d)),
        ("self_attn.k_proj.weight", ("attn", "k"), *heads_in(K, d)),
        ("self_attn.v_proj.weight", ("attn", "v"), *heads_in(K, d)),
        ("self_attn.o_proj.weight", ("attn", "o"), *heads_out(H, d)),
        ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), identity, identity),
        ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), identity, identity),
        ("pre_self_attn_layernorm.weight", ("pre_attn_norm", "scale"), identity, identity),
        ("post_self_attn_layernorm.weight", ("post_attn_norm", "scale"), identity, identity),
        ("pre_feedforward_layernorm.weight", ("pre_ffw_norm", "scale"), identity, identity),
        ("post_feedforward_layernorm.weight", ("post_ffw_norm", "scale"), identity, identity),
        ("mlp.gate_proj.weight", ("mlp", "gate"), transpose, transpose),
        ("mlp.up_proj.weight", ("mlp", "up"), transpose, transpose),
        ("mlp.down_proj.weight", ("mlp", "down"), transpose, transpose),
    ]
    return [HFEntry(hf_prefix + key, path + sub, index, a, b) for key, sub, a, b in table]


def text_hf_entries(cfg: T5Gemma2Config) -> list[HFEntry]:
    """Every text parameter of a model built from `cfg`, with its canonical HF key."""
    entries = [HFEntry(EMBEDDING_KEY, ("embedder", "table")), HFEntry(EOI_KEY, ("embedder", "eoi"))]
    for tower, tc, prefix in (("encoder", cfg.encoder, ENCODER_PREFIX), ("decoder", cfg.decoder, DECODER_PREFIX)):
        entries.append(HFEntry(prefix + "norm.weight", (tower, "norm", "scale")))
        period, num_blocks = stack_layout(tc.layer_types, cfg.scan_layers)
        for i in range(tc.num_layers):
            slot, index = layer_slot(period, num_blocks, i)
            entries += _layer_entries(tc, f"{prefix}layers.{i}.", (tower, "stack") + slot, index)
    return entries

"""Hugging Face `config.json` <-> `T5Gemma2Config`.

Accepts the current spelling (`rope_parameters` keyed by layer type, `layer_types`) and the older
one found on the Hub (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`).
"""

from __future__ import annotations

from typing import Any

from t5gemma2_jax.config import (FULL, SLIDING, ConfigError, T5Gemma2Config, TextConfig, VisionConfig,
                                 default_layer_types)

# transformers' T5Gemma2TextConfig / SiglipVisionConfig defaults, used for absent fields.
_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
                      query_pre_attn_scalar=256, rms_norm_eps=1e-6, max_position_embeddings=131_072)
_VISION_DEFAULTS = dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768,
                        intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        layer_norm_eps=1e-6)
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


def _rope_entry(entry: Any, where: str) -> tuple[float, float]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a dict, got {entry!r}")
    kind = entry.get("rope_type", entry.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConfigError(f"{where}.rope_type: {kind!r} is not supported (only 'default' and 'linear')")
    if "rope_theta" not in entry:
        raise ConfigError(f"{where}.rope_theta: missing")
    factor = float(entry.get("factor", 1.0)) if kind == "linear" else 1.0
    return float(entry["rope_theta"]), factor


def _rope(d: dict, where: str) -> dict:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        out = {}
        for layer_type, prefix in ((SLIDING, "rope_local"), (FULL, "rope_global")):
            if layer_type in params:
                theta, factor = _rope_entry(params[layer_type], f"{where}.rope_parameters.{layer_type}")
                out[f"{prefix}_theta"], out[f"{prefix}_factor"] = theta, factor
        return out
    if params is not None and not (isinstance(params, dict) and not params):
        raise ConfigError(f"{where}.rope_parameters: expected a dict keyed by layer type "
                          f"({SLIDING!r}, {FULL!r}), got {params!r}")
    # Legacy spelling: rope_theta (global), rope_local_base_freq (local), rope_scaling (global).
    out = {"rope_global_theta": float(d.get("rope_theta", 1_000_000.0)),
           "rope_local_theta": float(d.get("rope_local_base_freq", 10_000.0)),
           "rope_global_factor": 1.0, "rope_local_factor": 1.0}
    scaling = d.get("rope_scaling")
    if scaling:
        _, factor = _rope_entry({"rope_theta": 0.0, **scaling}, f"{where}.rope_scaling")
        out["rope_global_factor"] = factor
    return out


def text_config_from_hf(d: dict, where: str) -> TextConfig:
    g = lambda k: d.get(k, _TEXT_DEFAULTS.get(k))  # noqa: E731
    if d.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}.use_bidirectional_attention: must be false for T5Gemma 2")
    if d.get("attention_bias"):
        raise ConfigError(f"{where}.attention_bias: biased attention projections are not part of T5Gemma 2")
    act = d.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise ConfigError(f"{where}.hidden_activation: {act!r} is not supported (GeGLU with tanh GELU only)")
    L = g("num_hidden_layers")
    layer_types = d.get("layer_types")
    if layer_types is None:
        pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
        layer_types = default_layer_types(L, int(pattern))
    try:
        return TextConfig(
            vocab_size=g("vocab_size"), hidden_size=g("hidden_size"), intermediate_size=g("intermediate_size"),
            num_layers=L, num_heads=g("num_attention_heads"), num_kv_heads=g("num_key_value_heads"),
            head_dim=g("head_dim"), sliding_window=g("sliding_window"), layer_types=tuple(layer_types),
            query_pre_attn_scalar=float(g("query_pre_attn_scalar")), rms_norm_eps=float(g("rms_norm_eps")),
            final_logit_softcap=d.get("final_logit_softcapping"),
            max_position_embeddings=g("max_position_embeddings"), **_rope(d, where))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def vision_config_from_hf(d: dict, where: str = "vision_config") -> VisionConfig:
    """Our `VisionConfig` from an HF `vision_config` dict (SiglipVisionConfig.to_dict() / config.json).

    HF defaults apply to missing fields (SiglipVisionConfig's defaults, not So400m's). A MAP head
    (`vision_use_head: true`) is accepted and ignored: T5Gemma 2 never uses it."""
    g = lambda k: d.get(k, _VISION_DEFAULTS[k])  # noqa: E731
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise ConfigError(f"{where}.hidden_act: {act!r} is not supported (tanh GELU only)")
    try:
        return VisionConfig(image_size=g("image_size"), patch_size=g("patch_size"), num_channels=g("num_channels"),
                            hidden_size=g("hidden_size"), intermediate_size=g("intermediate_size"),
                            num_layers=g("num_hidden_layers"), num_heads=g("num_attention_heads"),
                            layer_norm_eps=float(g("layer_norm_eps")))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def vision_config_to_hf(v: VisionConfig) -> dict:
    """The HF `vision_config` dict for our `VisionConfig` (no MAP head)."""
    return {
        "model_type": "siglip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
        "num_channels": v.num_channels, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False, "attention_dropout": 0.0,
    }


def config_from_hf(d: dict, **overrides) -> T5Gemma2Config:
    """Build our config from a parsed T5Gemma 2 `config.json`; `overrides` set runtime fields."""
    if d.get("model_type") not in (None, "t5gemma2"):
        raise ConfigError(f"config.json: model_type {d.get('model_type')!r} is not 't5gemma2'")
    for key in ("encoder", "decoder"):
        if not isinstance(d.get(key), dict):
            raise ConfigError(f"config.json.{key}: missing or not a dict")
    enc = d["encoder"]
    text = enc.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("config.json.encoder.text_config: missing or not a dict")
    encoder = text_config_from_hf(text, "encoder.text_config")
    decoder = text_config_from_hf(d["decoder"], "decoder")
    vision = vision_config_from_hf(enc.get("vision_config") or {}, "encoder.vision_config")
    dec = d["decoder"]
    kw = dict(
        encoder=encoder, decoder=decoder, vision=vision,
        mm_tokens_per_image=int(enc.get("mm_tokens_per_image", 256)),
        # The top-level image id overrides the encoder's in transformers (T5Gemma2Config.__post_init__).
        image_token_id=int(d.get("image_token_index", enc.get("image_token_index", 256_001))),
        boi_token_id=int(enc.get("boi_token_index", 255_999)),
        eoi_token_id=int(d.get("eoi_token_index", enc.get("eoi_token_index", 256_000))),
        pad_token_id=int(dec.get("pad_token_id", d.get("pad_token_id", 0)) or 0),
        eos_token_id=first_id(dec.get("eos_token_id", d.get("eos_token_id", 1))),
        bos_token_id=int(dec.get("bos_token_id", d.get("bos_token_id", 2))),
    )
    kw.update(overrides)
    return T5Gemma2Config(**kw)


def first_id(x) -> int:
    """A token id that config.json may give as a list (several eos ids): the first."""
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def _text_to_hf(c: TextConfig, cfg: T5Gemma2Config, model_type: str) -> dict:
    def rope(theta, factor):
        if factor == 1.0:
            return {"rope_type": "default", "rope_theta": theta}
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}

    return {
        "model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "sliding_window": c.sliding_window, "layer_types": list(c.layer_types),
        # transformers' strict dataclass wants an int here.
        "query_pre_attn_scalar": (int(c.query_pre_attn_scalar) if float(c.query_pre_attn_scalar).is_integer()
                                  else c.query_pre_attn_scalar), "rms_norm_eps": c.rms_norm_eps,
        "final_logit_softcapping": c.final_logit_softcap, "attn_logit_softcapping": None,
        "max_position_embeddings": c.max_position_embeddings, "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "attention_dropout": 0.0, "dropout_rate": 0.0,
        "rope_parameters": {FULL: rope(c.rope_global_theta, c.rope_global_factor),
                            SLIDING: rope(c.rope_local_theta, c.rope_local_factor)},
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
        "tie_word_embeddings": True,
    }


def config_to_hf(cfg: T5Gemma2Config, dtype: str) -> dict:
    return {
        "architectures": ["T5Gemma2ForConditionalGeneration"],
        "model_type": "t5gemma2",
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "dtype": dtype,
        "encoder": {
            "model_type": "t5gemma2_encoder",
            "text_config": _text_to_hf(cfg.encoder, cfg, "t5gemma2_text"),
            "vision_config": vision_config_to_hf(cfg.vision),
            "mm_tokens_per_image": cfg.mm_tokens_per_image, "boi_token_index": cfg.boi_token_id,
            "eoi_token_index": cfg.eoi_token_id, "image_token_index": cfg.image_token_id,
        },
        "decoder": _text_to_hf(cfg.decoder, cfg, "t5gemma2_decoder"),
        "image_token_index": cfg.image_token_id, "eoi_token_index": cfg.eoi_token_id,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
        "vocab_size": cfg.vocab_size, "dropout_rate": 0.0, "attention_dropout": 0.0,
    }


def transformers_model(cfg: T5Gemma2Config, *, device: str = "cpu", dtype: str = "float32",
                       attn_implementation: str = "sdpa", seed: int = 0):
    """transformers' `T5Gemma2ForConditionalGeneration` of `cfg` with random weights (seeded), on
    `device` in `dtype`: the same architecture and shapes, for timing the same work side by side
    (`scripts/benchmark*.py`); `sdpa` by default, PyTorch's fastest built-in attention, on GPU
    too. Needs torch and transformers (the `test` extra)."""
    import torch
    from transformers import T5Gemma2Config as HFConfig, T5Gemma2ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration._from_config(HFConfig.from_dict(config_to_hf(cfg, "float32")),
                                                          attn_implementation=attn_implementation)
    return model.to(device=device, dtype=getattr(torch, dtype))

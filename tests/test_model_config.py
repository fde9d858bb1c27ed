"""Configs: presets, validation messages that name the field, HF config.json spellings."""

import json

import pytest

from t5gemma2_jax.checkpoints.hf_config import config_from_hf, config_to_hf, text_config_from_hf
from t5gemma2_jax.config import (FULL, SLIDING, ConfigError, PRESETS, T5Gemma2Config, default_layer_types, preset)


def test_presets_are_valid_and_match_the_release():
    for name in PRESETS:
        assert isinstance(preset(name), T5Gemma2Config)
    c = preset("270m-270m")
    assert (c.encoder.hidden_size, c.encoder.num_layers, c.encoder.num_heads, c.encoder.num_kv_heads) == (640, 18, 4, 1)
    assert [i for i, t in enumerate(c.encoder.layer_types) if t == FULL] == [5, 11, 17]
    assert c.encoder.rope_global_factor == 8.0 and c.encoder.rope_local_factor == 1.0
    assert preset("4b-4b").encoder.sliding_window == 1024
    assert preset("tiny", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ConfigError, match="preset: unknown name"):
        preset("2b-2b")


@pytest.mark.parametrize("change, field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(layer_types=(SLIDING,) * 3), "layer_types"),
    (dict(layer_types=("sliding_attention",) * 7 + ("chunked",)), "layer_types"),
    (dict(rope_global_factor=-1.0), "rope_global_factor"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    (dict(sliding_window=2.5), "sliding_window"),
    (dict(final_logit_softcap=0.0), "final_logit_softcap"),
])
def test_text_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"TextConfig\.{field}"):
        preset("tiny").encoder.replace(**change)


@pytest.mark.parametrize("change, field", [
    (dict(mm_tokens_per_image=15), "mm_tokens_per_image"),
    (dict(image_token_id=10_000), "image_token_id"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(attention_backend="magic"), "attention_backend"),
])
def test_model_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"T5Gemma2Config\.{field}"):
        preset("tiny", **change)


def test_towers_must_agree_on_width_and_vocab():
    c = preset("tiny")
    with pytest.raises(ConfigError, match="decoder.hidden_size"):
        c.replace(decoder=c.decoder.replace(hidden_size=32))
    with pytest.raises(ConfigError, match="decoder.vocab_size"):
        c.replace(decoder=c.decoder.replace(vocab_size=1000))


def test_dict_round_trip_and_unknown_fields():
    c = preset("tiny")
    assert T5Gemma2Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match=r"T5Gemma2Config\.colour: unknown key"):
        T5Gemma2Config.from_dict({**c.to_dict(), "colour": 1})


def _hf_text(**kw):
    base = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                query_pre_attn_scalar=256, rms_norm_eps=1e-6)
    base.update(kw)
    return base


def test_legacy_and_current_rope_spellings_agree():
    current = text_config_from_hf(_hf_text(
        layer_types=list(default_layer_types(18)),
        rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         SLIDING: {"rope_type": "default", "rope_theta": 1e4}}), "decoder")
    legacy = text_config_from_hf(_hf_text(
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
        _sliding_window_pattern=6), "decoder")
    assert current == legacy == preset("270m-270m").decoder.replace(max_position_embeddings=131072)
    assert text_config_from_hf(_hf_text(sliding_window_pattern=3), "d").layer_types[:3] == (SLIDING, SLIDING, FULL)


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={FULL: {"rope_type": "yarn", "rope_theta": 1e6}}), r"decoder\.rope_parameters\.full_attention\.rope_type"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"decoder\.rope_scaling\.rope_type"),
    (dict(use_bidirectional_attention=True), r"decoder\.use_bidirectional_attention"),
    (dict(hidden_activation="relu"), r"decoder\.hidden_activation"),
    (dict(num_key_value_heads=3), r"decoder: TextConfig\.num_kv_heads"),
])
def test_hf_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        text_config_from_hf(_hf_text(**change), "decoder")


def test_hf_config_round_trip():
    for name in ("tiny", "4b-4b"):
        c = preset(name)
        again = config_from_hf(json.loads(json.dumps(config_to_hf(c, "bfloat16"))))
        assert again == c


def test_top_level_image_token_wins():
    d = config_to_hf(preset("tiny"), "float32")
    d["encoder"]["image_token_index"] = 7
    d["image_token_index"] = 6
    assert config_from_hf(d).image_token_id == 6
    with pytest.raises(ConfigError, match="model_type"):
        config_from_hf({**d, "model_type": "gemma3"})

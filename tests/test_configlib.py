"""The config engine: base files and overlays, command-line coercion, one error type."""

from __future__ import annotations

import dataclasses

import pytest

from t5gemma2_jax import configlib
from t5gemma2_jax.config import ConfigError, preset
from t5gemma2_jax.data import DataConfig, DataConfigError
from t5gemma2_jax.experiment import load_config


def test_one_error_type():
    assert DataConfigError is ConfigError is configlib.ConfigError
    assert issubclass(ConfigError, ValueError)


def test_base_file_is_merged_under_the_overlay(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {preset: tiny, remat: full}\n"
                                        "data: {encoder_length: 64, decoder_length: 32}\n"
                                        "train: {steps: 9, log_every: 3}\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nmodel: {cross_attention: separate}\n"
                                           "train: {steps: 4}\n")
    cfg = load_config(tmp_path / "variant.yaml", ["train.log_every=2"])
    m = cfg.model_config()
    assert (m.remat, m.cross_attention) == ("full", "separate")        # merged key by key
    assert (cfg.data.encoder_length, cfg.train.steps, cfg.train.log_every) == (64, 4, 2)


def test_shipped_overlays_equal_their_base_plus_the_change():
    root = "configs"
    released = load_config(f"{root}/ablations/released.yaml")
    separate = load_config(f"{root}/ablations/separate_cross_attention.yaml")
    assert separate.model_config() == released.model_config().replace(cross_attention="separate")
    assert dataclasses.replace(separate, model=released.model) == released
    tiny, sft = load_config(f"{root}/tiny.yaml"), load_config(f"{root}/tiny_sft.yaml")
    assert sft.data.kind == "sft" and sft.optim.b2 == tiny.optim.b2 == 0.98 and sft.model == tiny.model


def test_bad_base_files_name_the_problem(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base: cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: no such file"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [x]\n")
    with pytest.raises(ConfigError, match="base: expected a file name"):
        load_config(tmp_path / "d.yaml")


def test_command_line_strings_coerce_to_the_field_type():
    cfg = configlib.with_overrides(DataConfig(), {"data.batch_size": "16", "shuffle": "false",
                                                  "max_bad_fraction": "1e-2", "eval": "none"}, "data")
    assert (cfg.batch_size, cfg.shuffle, cfg.max_bad_fraction, cfg.eval) == (16, False, 0.01, None)
    with pytest.raises(ConfigError, match=r"data\.shuffle: expected a bool"):
        configlib.with_overrides(DataConfig(), {"shuffle": "maybe"}, "data")


def test_nested_dataclasses_build_and_misspelt_keys_get_a_suggestion():
    c = preset("tiny")
    again = configlib.build(type(c), configlib.plain(c), "T5Gemma2Config")
    assert again == c and isinstance(again.encoder.layer_types, tuple)
    with pytest.raises(ConfigError, match=r"T5Gemma2Config\.encoder\.hiden_size: unknown key \(did you mean "
                                          r"'T5Gemma2Config\.encoder\.hidden_size'\?\)"):
        configlib.build(type(c), {**configlib.plain(c), "encoder": {**configlib.plain(c.encoder), "hiden_size": 1}},
                        "T5Gemma2Config")

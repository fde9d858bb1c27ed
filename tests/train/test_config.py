"""Experiment configs: the shipped YAML files, overrides, typing, errors, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from t5gemma2_jax.config import ConfigError
from t5gemma2_jax.experiment import ExperimentConfig, from_dict, load_config
from t5gemma2_jax.parallel import sharding_rules

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
NAMES = {"tiny", "tiny_sft", "270m-270m_pretrain", "270m-270m_sft", "1b-1b_pretrain", "1b-1b_sft",
         "4b-4b_pretrain", "4b-4b_sft", "4b-4b_long_context", "1b-1b_long_context", "tiny_lora", "4b-4b_lora_sft"}


def test_all_shipped_configs_load_and_say_what_hardware_they_are_for():
    assert NAMES <= {p.stem for p in CONFIGS}
    for path in CONFIGS:
        text = path.read_text()
        assert text.startswith("#") and "Hardware:" in text.split("\nmodel:")[0], path.name
        cfg = load_config(path)
        model = cfg.model_config()
        assert model.with_vision == cfg.data.images_enabled
        assert cfg.data.kind == ("sft" if "sft" in path.stem or "lora" in path.stem else "pretrain"), path.name
        assert cfg.lora.enabled == ("lora" in path.stem), path.name
        if not path.stem.startswith("tiny"):
            # A frozen base needs no float32 master copy; trained weights do.
            assert model.dtype == "bfloat16", path.name
            assert model.param_dtype == ("bfloat16" if cfg.lora.enabled else "float32"), path.name
            if cfg.data.images_enabled:
                assert cfg.data.mm_tokens_per_image == model.mm_tokens_per_image == 256
            assert cfg.data.encoder_length <= model.encoder.max_position_embeddings, path.name


def test_overrides_are_typed():
    cfg = load_config(CONFIGS[0].parent / "tiny.yaml", [
        "train.steps=7", "optim.learning_rate=1e-4", "train.progress_bar=false", "mesh.fsdp=2",
        "mesh.data=-1", "train.init_from=null", "model.remat=full", "model.encoder.num_layers=3",
        "data.ul2_denoisers=R:3:0.15:1.0,S:1.0", "mesh.rules={vocab: null, mlp: [fsdp, tensor]}"])
    assert cfg.train.steps == 7 and cfg.optim.learning_rate == 1e-4 and cfg.train.progress_bar is False
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (-1, 2)
    m = cfg.model_config()
    assert m.remat == "full" and m.encoder.num_layers == 3 and m.decoder.num_layers == 8
    assert m.encoder.layer_types == ("sliding_attention",) * 3  # re-derived for the new depth
    assert [d.kind for d in cfg.data.ul2_denoisers] == ["span", "prefix"]
    rules = dict(sharding_rules(cfg.mesh))
    assert rules["vocab"] is None and rules["mlp"] == ("fsdp", "tensor") and rules["embed"] == "fsdp"


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_evry=5", "train.checkpoint_evry: unknown key (did you mean 'train.checkpoint_every'?)"),
    ("optim.schedule=triangle", "optim.schedule: 'triangle' not in"),
    ("train.microbatches=3", "train.microbatches: 3 does not divide data.batch_size=8"),
    ("train.keep_best=true", "train.keep_best: needs periodic evaluation"),
    ("model.preset=7b", "model.preset: '7b' not in"),
    ("model.encoder=3", "model.encoder: must be a mapping"),
    ("mesh.rules={bogus: data}", "mesh.rules.bogus: unknown logical axis"),
    ("mesh.rules={vocab: pipeline}", "'pipeline' is not a mesh axis"),
    ("data.kind=chat", "data.kind"),
    ("train.init_from=5", "train.init_from: expected str or NoneType, got 5"),
    ("lora.rank=-1", "lora.rank: must be >= 0, got -1"),
    ("train.checkpoint_write_gb=0", "train.checkpoint_write_gb: must be >= 1, got 0"),
    ("lora.quantize_base=fp3", "lora.quantize_base: 'fp3' not in ('none', 'int8', 'nf4')"),
    ("lora.quantize_base=nf4", "lora.quantize_base: a quantised base needs adapters to train"),
    ("lora.rank=4 | lora.targets=[qq_proj]", "lora.targets: 'qq_proj' matches no projection; module names: ['q_proj'"),
    ("lora.rank=4 | lora.alpha=0", "lora.alpha: must be > 0"),
    ("lora.rank=4 | train.freeze_vision=false", "train.freeze_vision: false has no effect with adapters"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*override.split(" | "), "train.eval_every=0"])
    assert message in str(e.value)


def test_resolved_config_round_trips_through_yaml():
    for path in CONFIGS:
        cfg = load_config(path, ["train.steps=3", "model.decoder.num_layers=2"])
        again = from_dict(yaml.safe_load(cfg.to_yaml()))
        assert again == cfg, path.name
    assert from_dict({}) == ExperimentConfig()

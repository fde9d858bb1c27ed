"""DataConfig: validation messages name the field; dotted overrides from a command line."""

from __future__ import annotations

import pytest

from t5gemma2_jax.data import DataConfig, DataConfigError, DenoiserSpec, parse_denoisers


def test_defaults_are_valid_and_use_the_canonical_ul2_mixture():
    cfg = DataConfig()
    kinds = [(d.kind, d.mode) for d in cfg.ul2_denoisers]
    assert kinds.count(("span", "[NLU]")) == 2 and kinds.count(("span", "[NLG]")) == 4
    assert kinds.count(("prefix", "[S2S]")) == 1
    r = cfg.ul2_denoisers[0]
    assert (r.mean_span, r.noise_density) == (3.0, 0.15)


@pytest.mark.parametrize("kwargs, field", [
    (dict(encoder_length=0), "data.encoder_length"),
    (dict(decoder_length=1), "data.decoder_length"),
    (dict(batch_size=2.5), "data.batch_size"),
    (dict(kind="pretraining"), "data.kind"),
    (dict(max_bad_fraction=1.5), "data.max_bad_fraction"),
    (dict(mm_tokens_per_image=15), "data.mm_tokens_per_image"),
    (dict(encoder_length=16, mm_tokens_per_image=16), "data.encoder_length"),
    (dict(num_workers=-1), "data.num_workers"),
    (dict(sft_truncation="cut"), "data.sft_truncation"),
    (dict(packing="yes"), "data.packing"),
    (dict(ul2_denoisers="R:3:0.15"), "data.ul2_denoisers"),
    (dict(ul2_denoisers="R:3:1.5:1"), "noise_density"),
    (dict(ul2_denoisers="R:3:0.15:0,S:0"), "data.ul2_denoisers"),
])
def test_errors_name_the_field(kwargs, field):
    with pytest.raises(DataConfigError, match=field.replace(".", r"\.")):
        DataConfig(**kwargs)


def test_compact_denoiser_spec():
    specs = parse_denoisers("R:3:0.15:0.5, X:64:0.5:0.25, S:0.25")
    assert [(d.kind, d.mean_span, d.noise_density, d.weight, d.mode) for d in specs] == [
        ("span", 3.0, 0.15, 0.5, "[NLU]"), ("span", 64.0, 0.5, 0.25, "[NLG]"),
        ("prefix", 3.0, 0.15, 0.25, "[S2S]")]
    assert parse_denoisers([{"name": "a", "kind": "prefix", "mode": "[S2S]"}])[0].name == "a"
    assert DataConfig(ul2_denoisers=(DenoiserSpec("r"),)).ul2_denoisers[0].name == "r"


def test_dotted_overrides_are_typed():
    cfg = DataConfig().with_overrides({
        "data.train": "/data/train.jsonl", "data.eval": "none", "data.kind": "sft",
        "data.encoder_length": "512", "data.packing": "false", "data.max_bad_fraction": "0.2",
        "data.ul2_denoisers": "R:3:0.15:1,S:1", "num_workers": "2",
        "data.tokenizer_overrides": "image=256001,boi=255999"})
    assert cfg.train == "/data/train.jsonl" and cfg.eval is None and cfg.kind == "sft"
    assert cfg.encoder_length == 512 and cfg.packing is False and cfg.max_bad_fraction == 0.2
    assert cfg.num_workers == 2 and len(cfg.ul2_denoisers) == 2
    assert dict(cfg.tokenizer_overrides) == {"image": 256001, "boi": 255999}
    with pytest.raises(DataConfigError, match=r"data\.encoder_lenght: unknown key"):
        DataConfig().with_overrides({"data.encoder_lenght": "1"})
    with pytest.raises(DataConfigError, match=r"data\.batch_size: expected an integer"):
        DataConfig().with_overrides({"data.batch_size": "eight"})


def test_per_host_batch_size():
    assert DataConfig(batch_size=8).per_host_batch_size(4) == 2
    with pytest.raises(DataConfigError, match=r"data\.batch_size"):
        DataConfig(batch_size=6).per_host_batch_size(4)

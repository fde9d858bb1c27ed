"""Fine-tuning takes its architecture from `train.init_from`: a config whose preset differs from an
adapted Gemma 3 checkpoint only where adaptation legitimately differs (RoPE factor, eps stored as
float32, max positions) builds and loads with the checkpoint's values; fields given explicitly and a
preset of another size are refused in one line; `--check` opens the checkpoint without its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import LAYERS, small_config
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from t5gemma2_jax.checkpoints.gemma3 import config_from_gemma3
from t5gemma2_jax.checkpoints.hf import load_hf
from t5gemma2_jax.checkpoints.hf_config import config_to_hf
from t5gemma2_jax.config import ConfigError, preset
from t5gemma2_jax.experiment import from_dict
from t5gemma2_jax.train import Trainer, load_config
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
EPS_FLOAT32 = 9.999999974752427e-07          # 1e-6 as a float32 checkpoint config stores it

# The tiny preset's shape at 2 layers (small_config's model), with Gemma 3 270M/1B's unscaled
# global RoPE and a shorter context than the preset's 4096 positions.
GEMMA3_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   max_position_embeddings=2048, layer_types=["sliding_attention", "full_attention"],
                   bos_token_id=2, eos_token_id=1, pad_token_id=0)
TINY_TOKENS = ["--boi-token-id", "4", "--eoi-token-id", "5", "--image-token-id", "6"]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    """A tiny Gemma 3 checkpoint written by transformers, its config.json holding eps as a float32
    checkpoint config does."""
    import torch

    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("gemma3")
    Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_TINY, attn_implementation="eager")).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rms_norm_eps"] = EPS_FLOAT32
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.fixture(scope="module")
def adapted(gemma3, tmp_path_factory) -> Path:
    """`gemma3` adapted by scripts/adapt_gemma3.py with the source's RoPE and length, text only."""
    out = tmp_path_factory.mktemp("adapted") / "t5g2"
    load_script("adapt_gemma3").adapt(["--gemma3", str(gemma3), "--out", str(out), "--text-only", *TINY_TOKENS])
    return out


def test_adapting_with_the_presets_rope_and_length_gives_the_presets_architecture(gemma3, tmp_path):
    out = tmp_path / "export"
    load_script("adapt_gemma3").adapt(["--gemma3", str(gemma3), "--out", str(out), "--text-only", "--format", "orbax",
                                   "--rope-global-factor", "8", "--max-position-embeddings", "4096",
                                   "--mm-tokens-per-image", "16", *TINY_TOKENS])
    assert json.loads((out / "adaptation.json").read_text())["max_position_embeddings"] == 4096
    plain = small_config()
    m = small_config(train={"init_from": str(out)}).model_config()
    assert m.architecture_differences(plain.model_config()) == []
    assert (m.decoder.rope_global_factor, m.decoder.max_position_embeddings) == (8.0, 4096)


def test_architecture_differences_round_floats_to_float32():
    tiny = preset("tiny")
    stored = tiny.replace(encoder=tiny.encoder.replace(rms_norm_eps=EPS_FLOAT32),
                          decoder=tiny.decoder.replace(rms_norm_eps=EPS_FLOAT32))
    assert stored.architecture_differences(tiny) == []
    other = tiny.replace(decoder=tiny.decoder.replace(rms_norm_eps=2e-6, rope_global_factor=1.0))
    assert stored.architecture_differences(other, labels=("checkpoint", "config")) == [
        "decoder.rope_global_factor: checkpoint 8.0 != config 1.0",
        f"decoder.rms_norm_eps: checkpoint {EPS_FLOAT32!r} != config 2e-06"]


def test_the_model_is_the_adapted_checkpoints_and_loads(adapted):
    cfg = small_config(model={"preset": "tiny", "encoder": dict(LAYERS), "decoder": dict(LAYERS), "remat": "full"},
                       train={"init_from": str(adapted)})
    trainer = Trainer.build(cfg)
    m = trainer.model_config
    assert m == cfg.model_config()
    for tower in (m.encoder, m.decoder):   # the checkpoint's values where the tiny preset differs
        assert (tower.rope_global_factor, tower.max_position_embeddings, tower.rms_norm_eps) == (1.0, 2048, EPS_FLOAT32)
    assert (m.remat, m.with_vision) == ("full", False)    # runtime fields: the config's
    state = jax.device_get(trainer.state_from_pretrained(str(adapted)))
    source = load_hf(adapted, text_only=True)
    np.testing.assert_array_equal(state["params"]["embedder.table"], np.asarray(source.embedder.table.get_value()))


def test_fields_given_explicitly_must_be_the_checkpoints(adapted):
    model = {"preset": "tiny", "encoder": {**LAYERS, "rope_global_factor": 8.0}, "decoder": dict(LAYERS)}
    with pytest.raises(ConfigError, match=r"^train.init_from: .* has another architecture than the model\.\* fields "
                                          r"given .*: model\.encoder\.rope_global_factor: checkpoint 1\.0 != config 8\.0$"):
        small_config(model=model, train={"init_from": str(adapted)}).model_config()
    # Equal up to float32 rounding is equal.
    same = {"preset": "tiny", "encoder": {**LAYERS, "rms_norm_eps": 1e-6}, "decoder": dict(LAYERS)}
    assert small_config(model=same, train={"init_from": str(adapted)}).model_config().encoder.rms_norm_eps == EPS_FLOAT32
    # A preset of another size (8 layers) is refused, naming the fields.
    with pytest.raises(ConfigError, match=r"is not of model.preset tiny's size .*encoder\.num_layers: "
                                          r"checkpoint 2 != preset 8"):
        from_dict({"model": {"preset": "tiny"}, "data": {"max_images_per_row": 0},
                   "train": {"init_from": str(adapted)}}).model_config()


def test_the_270m_pretrain_config_takes_an_adapted_270m_checkpoint(tmp_path):
    """configs/270m-270m_pretrain.yaml with a Gemma 3 270M adapted at its own RoPE (x1), length
    (32768) and float32 eps: no override needed (the config of the checkpoint only; no weights)."""
    gemma3_270m = dict(model_type="gemma3_text", vocab_size=262_144, hidden_size=640, intermediate_size=2048,
                       num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       sliding_window=512, query_pre_attn_scalar=256, max_position_embeddings=32_768,
                       rms_norm_eps=EPS_FLOAT32, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                       rope_scaling=None, sliding_window_pattern=6, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    adapted = config_from_gemma3(gemma3_270m)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(adapted, "float32")))
    cfg = load_config(ROOT / "configs" / "270m-270m_pretrain.yaml", [f"train.init_from={tmp_path}"])
    m = Trainer.build(cfg).model_config
    assert m.architecture_differences(adapted) == []
    assert (m.decoder.rope_global_factor, m.decoder.max_position_embeddings) == (1.0, 32_768)
    assert (m.dtype, m.remat, m.attention_backend, m.with_vision) == ("bfloat16", "full", "splash", True)
    assert preset("270m-270m").architecture_differences(adapted) != []       # what the preset alone gave
    # Adapted with the release's RoPE and length, it is the preset's architecture (docs/adaptation.md).
    release = config_from_gemma3(gemma3_270m, rope_global_factor=8.0, max_position_embeddings=131_072)
    assert release.architecture_differences(preset("270m-270m")) == []


def _check(tmp_path, capsys, init_from, *overrides) -> tuple[int, str, str]:
    config = tmp_path / "ft.yaml"
    config.write_text(small_config(model={"preset": "tiny", "encoder": dict(LAYERS), "decoder": dict(LAYERS)},
                                   train={"data_source": "pipeline", "eval_every": 0}).to_yaml())
    rc = load_script("train").main(["--config", str(config), "--workdir", str(tmp_path / "w"), "--check",
                                f"train.init_from={init_from}", *overrides])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_check_opens_init_from_without_its_weights(adapted, tmp_path, capsys):
    # Weights that cannot be read do not matter to --check: it reads the checkpoint's config.
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    shutil.copy(adapted / "config.json", hollow / "config.json")
    (hollow / "model.safetensors").write_bytes(b"")
    rc, out, err = _check(tmp_path, capsys, hollow)
    assert rc == 0 and f"model from train.init_from (hf: {hollow})" in out, err

    rc, _, err = _check(tmp_path, capsys, hollow, "model.decoder.max_position_embeddings=4096")
    assert rc == 2 and err.count("\n") == 1 and "model.decoder.max_position_embeddings: checkpoint 2048 != config 4096" in err
    rc, _, err = _check(tmp_path, capsys, tmp_path / "nowhere")
    assert rc == 2 and err.startswith(f"error: train.init_from {tmp_path / 'nowhere'}: no such directory"), err
    rc, _, err = _check(tmp_path, capsys, tmp_path)
    assert rc == 2 and "neither a training work directory" in err, err

    # The tokenizer is checked against the checkpoint's model, not the preset's.
    config = json.loads((hollow / "config.json").read_text())
    config["decoder"]["eos_token_id"] = 7
    (hollow / "config.json").write_text(json.dumps(config))
    rc, _, err = _check(tmp_path, capsys, hollow)
    assert rc == 2 and "data.tokenizer: eos id 1 != model eos_token_id 7" in err, err

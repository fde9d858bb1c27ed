"""Gemma 3 -> T5Gemma 2 adaptation: with every encoder position masked out, the adapted decoder is
exactly transformers' Gemma3ForCausalLM; the SigLIP tower and projector carry over; exports load."""

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                          T5Gemma2ForConditionalGeneration)

from t5gemma2_jax.checkpoints.export import load_export
from t5gemma2_jax.checkpoints.gemma3 import adapt_gemma3, config_from_gemma3, gemma3_key
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from t5gemma2_jax.config import FULL, SLIDING, ConfigError, T5Gemma2Config, VisionConfig, default_layer_types
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]

# 270M-shaped: text only, H=4 / K=1, head_dim*H != D, 5 local : 1 global, no RoPE scaling.
TEXT_270M = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
                 max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)
TOKENS_270M = dict(boi_token_id=60, eoi_token_id=61, image_token_id=62)     # 256000 etc. do not fit in 64
TINY_VISION = VisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=24, num_layers=2,
                           num_heads=2)

# 4B-shaped: SigLIP + projector, H=4 / K=2 (GQA), odd window, linear x8 on global layers, and the
# vocabulary laid out like Gemma 3's: 68 text rows + 4 extra rows starting with the image token (68).
TEXT_4B = dict(vocab_size=72, hidden_size=32, intermediate_size=40, num_hidden_layers=7, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, sliding_window=5, query_pre_attn_scalar=10,
               max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0,
               rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                SLIDING: {"rope_type": "default", "rope_theta": 1e4}})
VISION_4B = dict(model_type="siglip_vision_model", image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=24, vision_use_head=False)
BOI_4B, EOI_4B, SRC_IMAGE_4B = 64, 65, 68
OVERRIDES_4B = dict(vocab_size=68, image_token_id=66)     # as 262208 -> 262144 rows, image 262144 -> 256001


def _perturb(model, seed):
    """transformers zero-initialises norms and the projector: perturb them so they matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.1)
    return model.eval()


def _rewrite(src: Path, dst: Path, rename=lambda k: k, extra=None, config=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config) if config else (src / "config.json").read_text())
    st = SafetensorsFile(src / "model.safetensors")
    tensors = [(rename(k), st.shape(k), st.get(k).dtype, (lambda k=k: np.array(st.get(k)))) for k in st.keys()]
    tensors += [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in (extra or {}).items()]
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


@pytest.fixture(scope="module")
def src_270m(tmp_path_factory):
    hf = _perturb(Gemma3ForCausalLM(Gemma3TextConfig(**TEXT_270M, attn_implementation="eager")), 1)
    saved = tmp_path_factory.mktemp("g3_270m_saved")
    hf.save_pretrained(saved)
    # The Hub's Gemma 3 270M/1B config.json spelling: legacy RoPE keys and a window pattern.
    cfg = json.loads((saved / "config.json").read_text())
    for k in ("rope_parameters", "layer_types"):
        cfg.pop(k)
    cfg.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None, sliding_window_pattern=6,
               eos_token_id=[1, 106])
    return hf, _rewrite(saved, tmp_path_factory.mktemp("g3_270m"), config=cfg)


@pytest.fixture(scope="module")
def src_4b(tmp_path_factory):
    cfg = Gemma3Config(text_config=TEXT_4B, vision_config=VISION_4B, mm_tokens_per_image=4,
                       boi_token_index=BOI_4B, eoi_token_index=EOI_4B, image_token_index=SRC_IMAGE_4B,
                       attn_implementation="eager")
    hf = _perturb(Gemma3ForConditionalGeneration(cfg), 2)
    saved = tmp_path_factory.mktemp("g3_4b_saved")
    hf.save_pretrained(saved)            # language_model.model.*, vision_tower.*, multi_modal_projector.*
    # ... and the older Hub layout of the SigLIP tower (vision_tower.vision_model.*).
    path = _rewrite(saved, tmp_path_factory.mktemp("g3_4b"),
                    rename=lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    # The reference: Gemma3ForCausalLM holding the multimodal checkpoint's language model.
    lm = Gemma3ForCausalLM(Gemma3TextConfig(**TEXT_4B, attn_implementation="eager")).eval()
    lm.model.load_state_dict(hf.model.language_model.state_dict())
    return hf, lm, path


def _ids(vocab, eoi, seed, B=2, T=13):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (B, T))
    ids[:, 0] = 2
    ids[0, 5] = eoi            # <end_of_image>: embedded through eoi_embedding in T5Gemma 2
    mask = np.ones((B, T), np.int64)
    mask[1, -3:] = 0           # right padding in the decoder
    return ids, mask


def _gemma3_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


# The public forward under jit (one compile is much cheaper than eager op-by-op dispatch).
_forward = nnx.jit(lambda model, enc, ids, enc_mask, mask: model(
    input_ids=enc, decoder_input_ids=ids, attention_mask=enc_mask, decoder_attention_mask=mask).logits)


def _masked_encoder_logits(model, ids, mask):
    """Decoder logits with every encoder position masked out."""
    enc = np.random.default_rng(0).integers(3, 50, (ids.shape[0], 6))
    return np.asarray(_forward(model, enc, ids, np.zeros_like(enc), mask))


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---------------------------------------------------------------------------------------------


def test_decoder_equals_gemma3_causal_lm_270m_shaped(src_270m):
    hf, path = src_270m
    # An RBG key: same initialisers, far cheaper to compile on a CPU than threefry.
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    model, info = adapt_gemma3(path, vision=TINY_VISION, mm_tokens_per_image=4, rngs=rngs, return_info=True,
                               **TOKENS_270M)
    cfg = model.config
    assert cfg.encoder == cfg.decoder and cfg.vocab_size == 64
    t = cfg.decoder
    assert (t.rope_global_factor, t.sliding_window, t.query_pre_attn_scalar) == (1.0, 4, 12)
    assert cfg.decoder.layer_types == default_layer_types(8) and cfg.eos_token_id == 1
    assert info["vision"] == "initialised" and info["vocab"]["rows_dropped"] == 0
    ids, mask = _ids(64, TOKENS_270M["eoi_token_id"], seed=3)
    ref = _gemma3_logits(hf, ids, mask)
    ours = _masked_encoder_logits(model, ids, mask)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # Both towers hold the source's weights; the shared table is the source's.
    p = _params(model)
    np.testing.assert_array_equal(p["embedder.table"], hf.model.embed_tokens.weight.detach().numpy())
    for name in [n for n in p if n.startswith("encoder.")]:
        np.testing.assert_array_equal(p[name], p["decoder" + name[len("encoder"):]])
    # The SigLIP tower and projector the source lacks come from the model's own initialisers.
    vision = {n: v for n, v in p.items() if n.startswith("vision.")}
    assert vision and all(np.isfinite(v).all() for v in vision.values())
    assert np.abs(vision["vision.projector.kernel"]).max() > 0
    assert not np.any(vision["vision.projector.norm.scale"])      # RMSNorm init: w = 0


def test_decoder_equals_gemma3_and_vision_carries_over_4b_shaped(src_4b):
    hf, lm, path = src_4b
    model, info = adapt_gemma3(path, return_info=True, **OVERRIDES_4B)
    cfg = model.config
    assert (cfg.vocab_size, cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id) == (68, 66, BOI_4B, EOI_4B)
    assert (cfg.decoder.rope_global_factor, cfg.decoder.num_kv_heads, cfg.mm_tokens_per_image) == (8.0, 2, 4)
    assert info["vision"] == "copied" and info["vocab"]["rows_dropped"] == 4
    ids, mask = _ids(68, EOI_4B, seed=4)
    ref = _gemma3_logits(lm, ids, mask)
    np.testing.assert_allclose(ref, _gemma3_logits(hf, ids, mask), atol=1e-5)   # same language model
    ours = _masked_encoder_logits(model, ids, mask)
    assert ours.shape == ref.shape[:2] + (68,)
    np.testing.assert_allclose(ours, ref[..., :68], atol=1e-4, rtol=0)
    # The eoi vector is the source row scaled exactly as the embedder scales rows.
    emb = np.asarray(model.embedder.encode(jnp.asarray([[EOI_4B]])))[0, 0]
    np.testing.assert_array_equal(emb, np.asarray(model.embedder.table[EOI_4B] * jnp.float32(np.sqrt(32))))
    # SigLIP + projector: our image features equal Gemma 3's.
    pixels = np.random.default_rng(5).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        feats = hf.get_image_features(torch.as_tensor(pixels)).pooler_output.numpy()
    ours = nnx.jit(lambda m, x: m.vision(x))(model, jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(ours), feats, atol=1e-5, rtol=0)


def test_script_hf_and_orbax_exports(src_4b, tmp_path):
    _, lm, path = src_4b
    script = load_script("adapt_gemma3")
    args = ["--gemma3", str(path), "--vocab-size", "68", "--image-token-id", "66", "--rope-global-factor", "4"]
    script.adapt(args + ["--out", str(tmp_path / "hf"), "--format", "hf"])
    back = T5Gemma2ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert back.config.decoder.rope_parameters[FULL]["factor"] == 4.0
    assert json.loads((tmp_path / "hf" / "adaptation.json").read_text())["vision"] == "copied"
    # Global RoPE changed, so compare with a Gemma 3 that has the same override.
    lm4 = Gemma3ForCausalLM(Gemma3TextConfig(**{**TEXT_4B, "rope_parameters": {
        FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}, SLIDING: TEXT_4B["rope_parameters"][SLIDING]}},
        attn_implementation="eager")).eval()
    lm4.load_state_dict(lm.state_dict())
    ids, mask = _ids(68, EOI_4B, seed=6)
    enc = np.full((2, 5), 7)
    with torch.no_grad():
        out = back(input_ids=torch.as_tensor(enc), attention_mask=torch.zeros(2, 5, dtype=torch.long),
                   decoder_input_ids=torch.as_tensor(ids), decoder_attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(out, _gemma3_logits(lm4, ids, mask)[..., :68], atol=1e-4, rtol=0)

    written = script.adapt(args + ["--out", str(tmp_path / "orbax"), "--format", "orbax"])
    assert (tmp_path / "orbax" / "model_config.json").exists() and (tmp_path / "orbax" / "params").is_dir()
    restored = load_export(tmp_path / "orbax")
    assert restored.config == written.config and restored.config.decoder.rope_global_factor == 4.0
    a, b = _params(restored), _params(written)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---- configuration and key handling (no weights) ---------------------------------------------

HUB_270M = {  # the shape of google/gemma-3-270m's config.json
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "max_position_embeddings": 32768, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "use_bidirectional_attention": False, "eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0}
HUB_4B = {  # the shape of google/gemma-3-4b-pt's config.json (text fields left at their defaults)
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
    "eoi_token_index": 256000, "image_token_index": 262144, "mm_tokens_per_image": 256, "eos_token_id": [1, 106],
    "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False}}


def test_config_for_released_sizes():
    c = config_from_gemma3(HUB_270M)
    t = c.decoder
    assert c.encoder == t and (c.vocab_size, c.image_token_id, c.boi_token_id, c.eoi_token_id) == (262144, 256001,
                                                                                                     255999, 256000)
    assert (t.hidden_size, t.num_layers, t.sliding_window, t.rope_global_factor, t.rope_local_theta) == (
        640, 18, 512, 1.0, 10000.0)
    assert t.layer_types == default_layer_types(18) and c.eos_token_id == 1
    assert c.vision == VisionConfig() and c.mm_tokens_per_image == 256 and c.with_vision
    assert config_from_gemma3(HUB_270M, rope_global_factor=8.0).encoder.rope_global_factor == 8.0
    c = config_from_gemma3(HUB_4B)
    t = c.decoder
    assert (c.vocab_size, c.image_token_id, c.eoi_token_id) == (262144, 256001, 256000)      # 262208 rows cut
    assert (t.num_heads, t.num_kv_heads, t.head_dim, t.sliding_window, t.rope_global_factor) == (8, 4, 256, 1024, 8.0)
    assert c.vision == VisionConfig() and not config_from_gemma3(HUB_4B, text_only=True).with_vision


@pytest.mark.parametrize("change, match", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="t5gemma2"), "model_type"),
])
def test_unsupported_sources_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        config_from_gemma3({**HUB_270M, **change})


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_size=64), "comes from the source"),
    (dict(encoder=None), "both towers"),
    (dict(rope_globl_factor=8.0), "unknown override"),
    (dict(vocab_size=1000, image_token_id=5), r"boi_token_id.*pass boi_token_id="),
    (dict(vision=VisionConfig(image_size=28, patch_size=14)), "own SigLIP tower"),
])
def test_bad_overrides_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_gemma3(HUB_4B, **overrides)


@pytest.mark.skipif(not hasattr(T5Gemma2Config, "cross_attention"), reason="no architecture ablations")
def test_ablation_architectures_are_refused():
    with pytest.raises(ConfigError, match="released architecture"):
        config_from_gemma3(HUB_270M, cross_attention="separate")


def test_source_key_layouts():
    assert gemma3_key("model.layers.3.mlp.up_proj.weight") == ("text", "layers.3.mlp.up_proj.weight")
    assert gemma3_key("layers.0.input_layernorm.weight") == ("text", "layers.0.input_layernorm.weight")
    for k in ("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"):
        assert gemma3_key(k) == ("text", "embed_tokens.weight")
    for k in ("lm_head.weight", "language_model.lm_head.weight"):
        assert gemma3_key(k) == ("lm_head", "weight")
    for k in ("model.vision_tower.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias",
              "model.vision_tower.vision_model.post_layernorm.bias"):
        assert gemma3_key(k) == ("vision", "post_layernorm.bias")
    assert gemma3_key("vision_tower.vision_model.head.probe") == ("vision_head", "head.probe")
    assert gemma3_key("multi_modal_projector.mm_soft_emb_norm.weight") == ("projector", "mm_soft_emb_norm.weight")
    assert gemma3_key("model.encoder.layers.0.mlp.up_proj.weight") is None


def test_bf16_source_and_unscanned_layers(src_270m, tmp_path):
    hf, _ = src_270m
    path = tmp_path / "bf16"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(path)      # the fixture's model stays fp32
    tokens = dict(TOKENS_270M, eoi_token_id=9)
    scanned = _params(adapt_gemma3(path, dtype=jnp.bfloat16, text_only=True, **tokens))
    flat = _params(adapt_gemma3(path, dtype=jnp.bfloat16, text_only=True, scan_layers=False, **tokens))
    table = hf.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    assert scanned["embedder.table"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(scanned["embedder.table"].astype(np.float32), table)
    # eoi = row * sqrt(32) with sqrt(32) rounded to bf16 (5.65625) and the product rounded to bf16.
    expected = (table[9] * np.float32(jnp.bfloat16(np.sqrt(32)))).astype(jnp.bfloat16)
    np.testing.assert_array_equal(scanned["embedder.eoi"], expected)
    q7 = hf.model.layers[7].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()
    for tower in ("encoder", "decoder"):   # layer 7 = the remainder after one scanned 6-layer block
        np.testing.assert_array_equal(flat[f"{tower}.stack.layers.7.attn.q"].astype(np.float32),
                                      q7.T.reshape(32, 4, 16))
        np.testing.assert_array_equal(flat[f"{tower}.stack.layers.7.attn.q"], scanned[f"{tower}.stack.layers.1.attn.q"])
        np.testing.assert_array_equal(flat[f"{tower}.stack.layers.2.mlp.up"],
                                      scanned[f"{tower}.stack.blocks.layers.2.mlp.up"][0])


def test_checkpoint_problems_are_listed(src_270m, tmp_path):
    hf, path = src_270m
    bad = _rewrite(path, tmp_path / "bad", extra={"model.bogus": np.zeros(3, np.float32),
                                                  "lm_head.weight": np.ones((64, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"unknown keys \(1\).*model\.bogus"):
        adapt_gemma3(bad, text_only=True, **TOKENS_270M)
    bad = _rewrite(path, tmp_path / "tied", extra={"lm_head.weight": np.ones((64, 32), np.float32)})
    with pytest.raises(CheckpointError, match="ties the LM head"):
        adapt_gemma3(bad, text_only=True, **TOKENS_270M)
    bad = _rewrite(path, tmp_path / "missing", rename=lambda k: k.replace("layers.7.mlp.up", "layers.7.mlp.upp"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*layers\.7\.mlp\.up_proj"):
        adapt_gemma3(bad, text_only=True, **TOKENS_270M)

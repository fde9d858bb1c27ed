"""Vision tower, projector and image insertion vs the Hugging Face reference (fp32, eager,
perturbed weights), loaded through our HF entries in both key layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_vision_utils import (build_hf_model, export_entries, from_hf, hf_state_dict_numpy, make_mm_batch,
                             make_pixel_values, tiny_vision_config)
from t5gemma2_jax.config import ConfigError, preset
from t5gemma2_jax.checkpoints.hf_config import vision_config_from_hf, vision_config_to_hf
from t5gemma2_jax.checkpoints.hf_vision import legacy_vision_key, normalize_vision_key, vision_hf_entries
from t5gemma2_jax.vision import VisionEncoder, check_image_placeholders, insert_image_features

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    """HF model, its numpy state dict, a mixed batch, and HF's vision outputs for it."""
    cfg = tiny_vision_config()
    hf = build_hf_model(cfg, seed=0)
    batch = make_mm_batch(cfg, seed=0, images_per_row=(2, 0, 1))
    enc = hf.model.encoder
    with torch.no_grad():
        px = torch.from_numpy(batch["pixel_values"])
        out = enc.get_image_features(px, return_dict=True)
        ids = torch.from_numpy(batch["input_ids"]).long()
        embeds = enc.text_model.embed_tokens(ids)
        feats = out.pooler_output.to(embeds.dtype)
        mask = enc.get_image_placeholder_mask(ids, inputs_embeds=embeds, image_features=feats)
        merged = embeds.masked_scatter(mask, feats)
    return dict(
        cfg=cfg, hf=hf, sd=hf_state_dict_numpy(hf), batch=batch,
        last_hidden=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
        embeds=embeds.numpy(), merged=merged.numpy(),
    )


def _ours(cfg, sd, key_fn=lambda k: k) -> VisionEncoder:
    return from_hf(cfg, sd, key_fn=key_fn)


@jax.jit
def _forward(model: VisionEncoder, px: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(SigLIP last_hidden_state, projected features), one compiled program per config."""
    return model.last_hidden_state(px), model(px)


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (False, "none"), (True, "full")])
def test_tower_and_projector_match_hf(ref, scan_layers, remat):
    cfg = ref["cfg"].replace(scan_layers=scan_layers, remat=remat)
    model = _ours(cfg, ref["sd"])
    px = jnp.asarray(ref["batch"]["pixel_values"])
    hidden, feats = _forward(model, px)
    assert hidden.shape == ref["last_hidden"].shape == (3, 64, 32)
    assert feats.shape == ref["pooled"].shape == (3, cfg.mm_tokens_per_image, cfg.hidden_size)
    assert _maxdiff(hidden, ref["last_hidden"]) <= TOL
    assert _maxdiff(feats, ref["pooled"]) <= TOL
    # The check discriminates: the projector output is O(1), not ~0.
    assert np.abs(ref["pooled"]).max() > 0.3


def test_legacy_vision_model_key_layout_loads(ref):
    cfg = ref["cfg"]
    legacy = {legacy_vision_key(k): v for k, v in ref["sd"].items()}
    assert any(".vision_tower.vision_model.encoder.layers.0." in k for k in legacy)
    assert normalize_vision_key("model.encoder.vision_tower.vision_model.post_layernorm.weight") == \
        "model.encoder.vision_tower.post_layernorm.weight"
    assert normalize_vision_key("model.encoder.text_model.norm.weight") == "model.encoder.text_model.norm.weight"
    model = _ours(cfg, legacy, key_fn=normalize_vision_key)
    _, feats = _forward(model, jnp.asarray(ref["batch"]["pixel_values"]))
    assert _maxdiff(feats, ref["pooled"]) <= TOL


@pytest.mark.parametrize("scan_layers", [True, False])
def test_entries_cover_hf_exactly_and_round_trip(ref, scan_layers):
    cfg = ref["cfg"].replace(scan_layers=scan_layers)
    entries = vision_hf_entries(cfg)
    hf_vision = {k for k in ref["sd"] if ".vision_tower." in k or ".multi_modal_projector." in k}
    assert {e.hf_key for e in entries} == hf_vision  # every HF vision tensor, nothing else
    # Every parameter of ours is written (scanned params by every layer index).
    model = nnx.eval_shape(lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)))
    paths = {p for p, _ in nnx.state(model, nnx.Param).flat_state()}
    assert {e.path for e in entries} == paths
    # to_hf(to_ours(x)) == x bit for bit, and export after import gives HF's state dict back.
    for e in entries:
        x = ref["sd"][e.hf_key]
        np.testing.assert_array_equal(e.to_hf(e.to_ours(x)), x)
    model = _ours(cfg, ref["sd"])
    exported = export_entries(model, entries)
    for k, v in exported.items():
        assert v.shape == ref["sd"][k].shape, k
        np.testing.assert_array_equal(v, ref["sd"][k])
    # Same number of parameters as HF's tower + projector.
    n_ours = sum(int(np.prod(v[...].shape)) for _, v in nnx.state(model, nnx.Param).flat_state())
    assert n_ours == sum(ref["sd"][k].size for k in hf_vision)


def test_insertion_matches_hf_masked_scatter(ref):
    """Rows with 2, 0 and 1 images and right padding: both our layouts equal HF's masked_scatter."""
    cfg, batch = ref["cfg"], ref["batch"]
    model = _ours(cfg, ref["sd"])
    embeds = jnp.asarray(ref["embeds"])
    ids = jnp.asarray(batch["input_ids"])
    check_image_placeholders(batch["input_ids"], 3, cfg.mm_tokens_per_image, cfg.image_token_id)
    check_image_placeholders(batch["input_ids"], batch["image_mask"], cfg.mm_tokens_per_image, cfg.image_token_id)

    _, feats = _forward(model, jnp.asarray(batch["pixel_values"]))
    flat = insert_image_features(embeds, ids, feats, cfg.image_token_id)
    assert _maxdiff(flat, ref["merged"]) <= TOL

    _, per_row_feats = _forward(model, jnp.asarray(batch["pixel_values_per_row"]))  # [B, M, n, D]
    assert per_row_feats.shape == (3, 2, cfg.mm_tokens_per_image, cfg.hidden_size)
    per_row = jax.jit(insert_image_features, static_argnums=3)(
        embeds, ids, per_row_feats, cfg.image_token_id, jnp.asarray(batch["image_mask"]))
    assert _maxdiff(per_row, ref["merged"]) <= TOL
    # Non-placeholder rows are untouched; the image rows did change.
    is_img = batch["input_ids"] == cfg.image_token_id
    np.testing.assert_array_equal(np.asarray(per_row)[~is_img], ref["embeds"][~is_img])
    assert _maxdiff(np.asarray(per_row)[is_img], ref["embeds"][is_img]) > 0.1


def test_placeholder_mismatch_is_a_clear_error_like_hf(ref):
    cfg, batch = ref["cfg"], ref["batch"]
    ids = batch["input_ids"].copy()
    ids[0, np.nonzero(ids[0] == cfg.image_token_id)[0][0]] = 7  # row 0 loses one placeholder
    with pytest.raises(ValueError, match=r"row 0: 31 image tokens but 2 images x 16 = 32"):
        check_image_placeholders(ids, batch["image_mask"], cfg.mm_tokens_per_image, cfg.image_token_id)
    with pytest.raises(ValueError, match=r"47 image tokens .* 3 images x 16 tokens per image = 48"):
        check_image_placeholders(ids, 3, cfg.mm_tokens_per_image, cfg.image_token_id)
    # HF refuses the same input.
    with torch.no_grad(), pytest.raises(Exception, match="do not match"):
        ref["hf"].model.encoder(input_ids=torch.from_numpy(ids).long(),
                                pixel_values=torch.from_numpy(batch["pixel_values"]))


def test_random_pixels_second_seed(ref):
    """A different image set through the same loaded weights (guards against a lucky batch)."""
    cfg = ref["cfg"]
    px = make_pixel_values(2, cfg, seed=7) * 1.5  # slightly outside [-1, 1] too
    with torch.no_grad():
        want = ref["hf"].model.encoder.get_image_features(torch.from_numpy(px), return_dict=True).pooler_output
    _, got = _forward(_ours(cfg, ref["sd"]), jnp.asarray(px))
    assert _maxdiff(got, want.numpy()) <= TOL


def test_vision_config_from_and_to_hf(ref):
    cfg = ref["cfg"]
    hf_vision = ref["hf"].config.encoder.vision_config
    assert vision_config_from_hf(hf_vision.to_dict()) == cfg.vision
    # Our export is a valid SiglipVisionConfig that reads back identically, So400m included.
    from transformers import SiglipVisionConfig

    for v in (cfg.vision, preset("4b-4b").vision):
        d = vision_config_to_hf(v)
        assert vision_config_from_hf(SiglipVisionConfig(**d).to_dict()) == v
    so400m = vision_config_from_hf(dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                        num_attention_heads=16, image_size=896, patch_size=14,
                                        layer_norm_eps=1e-6, vision_use_head=False))
    assert so400m == preset("270m-270m").vision
    with pytest.raises(ConfigError, match="hidden_act"):
        vision_config_from_hf(dict(hidden_act="relu"))

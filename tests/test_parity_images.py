"""Full-model parity with images: SigLIP tower, projector and insertion inside the encoder."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import T5Gemma2ForConditionalGeneration

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from hf_reference import BOI, EOI, IMAGE, build_hf_model, hf_forward

TOKENS = 4   # mm_tokens_per_image (perfect square); the tiny SigLIP has 4x4 patches -> 2x2 pooling


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf_model(seed=11, encoder=dict(window=4, pattern=3, layers=5), mm_tokens_per_image=TOKENS)
    path = tmp_path_factory.mktemp("hf_mm")
    hf.save_pretrained(path)
    return hf, path


def _batch(seed=0):
    """Row 0 holds two images, row 1 none (and padding), row 2 one image."""
    rng = np.random.default_rng(seed)
    S, T = 24, 7
    image = [BOI] + [IMAGE] * TOKENS + [EOI]
    rows = [
        [2, 11] + image + [12, 13] + image + [14],
        [2] + list(rng.integers(7, 99, 12)),
        [2, 15, 16] + image + list(rng.integers(7, 99, 6)),
    ]
    ids = np.zeros((3, S), np.int64)
    mask = np.zeros((3, S), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, 1
    dids = rng.integers(7, 99, (3, T))
    dids[:, 0] = 2
    pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)   # images in row-major order
    return ids, mask, dids, np.ones_like(dids), pixels


@pytest.mark.slow
def test_logits_and_image_features_match(pair):
    hf, path = pair
    ids, mask, dids, dmask, pixels = _batch()
    ref = hf_forward(hf, ids, mask, dids, dmask, pixel_values=pixels)
    model = tg.load_hf(path)
    out = model(jnp.asarray(ids), jnp.asarray(dids), jnp.asarray(mask), jnp.asarray(dmask), jnp.asarray(pixels))
    logits, enc = out.logits, out.encoder_states
    assert np.abs(np.asarray(enc) - ref.encoder_last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(logits) - ref.logits.numpy()).max() <= 1e-4
    import torch
    with torch.no_grad():
        feats = hf.model.encoder.get_image_features(torch.as_tensor(pixels)).pooler_output.numpy()
    ours = np.asarray(model.vision(jnp.asarray(pixels)))
    assert np.abs(ours - feats.reshape(ours.shape)).max() <= 1e-5
    # Without its images the same batch gives different logits: the images are really used.
    ids_no_img = np.where(ids == IMAGE, 7, ids)
    plain = np.asarray(model(jnp.asarray(ids_no_img), jnp.asarray(dids), jnp.asarray(mask), jnp.asarray(dmask)).logits)
    assert np.abs(plain - np.asarray(logits)).max() > 1e-3


@pytest.mark.slow
def test_per_row_image_layout_gives_the_same_logits(pair):
    _, path = pair
    ids, mask, dids, dmask, pixels = _batch(1)
    model = tg.load_hf(path, scan_layers=False)
    flat = np.asarray(model(ids, dids, mask, dmask, pixels).logits)
    per_row = np.zeros((3, 2, 3, 16, 16), np.float32)
    per_row[0, 0], per_row[0, 1], per_row[2, 0] = pixels
    image_mask = np.array([[1, 1], [0, 0], [1, 0]], bool)
    rows = np.asarray(model(ids, dids, mask, dmask, per_row, image_mask=image_mask).logits)
    np.testing.assert_allclose(rows, flat, atol=1e-5)


def test_placeholder_count_mismatch_is_refused(pair):
    _, path = pair
    ids, mask, dids, dmask, pixels = _batch(2)
    model = tg.load_hf(path)
    with pytest.raises(ValueError, match="image"):
        model(ids, dids, mask, dmask, pixels[:2])


def test_round_trip_with_vision_and_legacy_layout(pair, tmp_path):
    hf, path = pair
    ids, mask, dids, dmask, pixels = _batch(3)
    ref = hf_forward(hf, ids, mask, dids, dmask, pixel_values=pixels).logits.numpy()
    tg.save_hf(tg.load_hf(path), tmp_path / "out")
    back = T5Gemma2ForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_forward(back, ids, mask, dids, dmask, pixel_values=pixels).logits.numpy(), ref)
    # the older `vision_tower.vision_model.` segment loads too
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(path / "config.json", legacy / "config.json")
    st = SafetensorsFile(path / "model.safetensors")
    rename = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")  # noqa: E731
    write_safetensors(legacy / "model.safetensors",
                      [(rename(k), st.shape(k), st.get(k).dtype, (lambda k=k: np.array(st.get(k)))) for k in st.keys()])
    out = np.asarray(tg.load_hf(legacy)(ids, dids, mask, dmask, pixels).logits)
    assert np.abs(out - ref).max() <= 1e-4

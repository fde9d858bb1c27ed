"""Acceptance: the loss of a packed batch equals the token-weighted loss of the same examples
run one by one without packing (fp32, <= 1e-5), with images among them."""

from __future__ import annotations

import numpy as np
import pytest

from data_test_helpers import color_of, png_b64, tok  # noqa: F401  (fixture)
from t5gemma2_jax.data import DataConfig, make_pipeline

try:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from t5gemma2_jax.config import preset
    from t5gemma2_jax.model import T5Gemma2
except ImportError as e:  # the model lands separately from the data pipeline
    pytest.skip(f"t5gemma2_jax.model is not importable yet: {e}", allow_module_level=True)


def _ce_sum(logits, targets, weights):
    """sum(w * CE) and sum(w) in float32."""
    logits = jnp.asarray(logits, jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    w = jnp.asarray(weights, jnp.float32)
    return float(jnp.sum((lse - tgt) * w)), float(jnp.sum(w))


@pytest.mark.slow
def test_packed_loss_equals_unpacked_loss(tok):
    tiny = preset("tiny")
    # The tiny preset cut to one local + one global layer per tower (fast to compile); windows
    # stay shorter than the sequences so that the per-segment windows are exercised.
    text = tiny.encoder.replace(num_layers=2, layer_types=("sliding_attention", "full_attention"))
    cfg_model = tiny.replace(encoder=text, decoder=text, vision=tiny.vision.replace(num_layers=1))
    image_size, mm = cfg_model.vision.image_size, cfg_model.mm_tokens_per_image
    records = []
    for i in range(12):
        text = f"example {i}: a small red circle number {i} above a blue square {i * 7}."
        if i % 3 == 0:
            records.append({"text": text})
        elif i % 3 == 1:
            records.append({"text": text, "images": [png_b64(color_of(i), 40)]})
        else:
            records.append({"text": "<start_of_image> first, then <start_of_image> " + text,
                            "images": [png_b64(color_of(i), 40), png_b64(color_of(100 + i), 24)]})
    cfg = DataConfig(kind="pretrain", encoder_length=192, decoder_length=64, batch_size=2,
                     max_images_per_row=4, image_size=image_size, mm_tokens_per_image=mm,
                     packing_bins=2, ul2_denoisers="R:3:0.15:1,X:3:0.5:1,S:1")
    batch = next(make_pipeline(cfg, "eval", records=records))
    seg = batch["decoder_segment_ids"]
    assert seg.max(axis=1).min() >= 2, "the test needs rows with several packed examples"
    assert batch["image_mask"].sum() >= 3, "the test needs images in the packed rows"

    model = T5Gemma2(cfg_model, rngs=nnx.Rngs(0))
    # Un-zero the zero-initialised parameters (norms, eoi, projector) so that no path hides.
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
              else x for x, k in zip(leaves, keys)]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

    @nnx.jit
    def forward(model, inputs):
        return model(**inputs).logits

    logits = forward(model, dict(
        input_ids=batch["encoder_input_ids"], decoder_input_ids=batch["decoder_input_ids"],
        encoder_segment_ids=batch["encoder_segment_ids"],
        decoder_segment_ids=batch["decoder_segment_ids"],
        encoder_positions=batch["encoder_positions"], decoder_positions=batch["decoder_positions"],
        pixel_values=batch["pixel_values"], image_mask=batch["image_mask"]))
    packed_sum, packed_w = _ce_sum(logits, batch["decoder_target_ids"], batch["decoder_loss_weights"])

    # The same examples unpacked: one example per row, plain padding masks, no segment ids or
    # positions (the model's ordinary padded path), all in one call.
    S, T, M = batch["encoder_input_ids"].shape[1], seg.shape[1], batch["image_mask"].shape[1]
    rows = []
    for r in range(seg.shape[0]):
        images = batch["pixel_values"][r][batch["image_mask"][r]]
        used = 0
        for s in range(1, int(seg[r].max()) + 1):
            enc = batch["encoder_input_ids"][r][batch["encoder_segment_ids"][r] == s]
            dec = seg[r] == s
            k = int((enc == tok.special.boi).sum())
            targets = batch["decoder_target_ids"][r][dec]
            dec_in = np.concatenate([[tok.special.bos], targets[:-1]])  # the plain shift
            np.testing.assert_array_equal(batch["decoder_input_ids"][r][dec], dec_in)
            rows.append((enc, dec_in, targets, batch["decoder_loss_weights"][r][dec],
                         images[used:used + k]))
            used += k
        assert used == len(images)
    n = len(rows)
    assert n == int(seg.max(axis=1).sum())
    ids, mask = np.zeros((n, S), np.int32), np.zeros((n, S), np.int32)
    dids, dmask = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
    tgts, ws = np.zeros((n, T), np.int32), np.zeros((n, T), np.float32)
    px = np.zeros((n, M, 3, image_size, image_size), np.float32)
    pmask = np.zeros((n, M), bool)
    for i, (enc, dec_in, targets, w, imgs) in enumerate(rows):
        ids[i, :len(enc)], mask[i, :len(enc)] = enc, 1
        dids[i, :len(dec_in)], dmask[i, :len(dec_in)] = dec_in, 1
        tgts[i, :len(targets)], ws[i, :len(w)] = targets, w
        px[i, :len(imgs)], pmask[i, :len(imgs)] = imgs, True
    ref_sum = ref_w = 0.0
    B = seg.shape[0]
    for lo in range(0, n, B):  # in batches of the packed shape: one compilation only
        part = [a[lo:lo + B] for a in (ids, mask, dids, dmask, px, pmask, tgts, ws)]
        pad = B - len(part[0])
        part = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in part]
        part[1][len(part[1]) - pad:] = 1  # empty rows: unmasked padding, zero loss weight
        part[3][len(part[3]) - pad:] = 1
        ref_logits = forward(model, dict(input_ids=part[0], attention_mask=part[1],
                                         decoder_input_ids=part[2], decoder_attention_mask=part[3],
                                         pixel_values=part[4], image_mask=part[5]))
        s_sum, s_w = _ce_sum(ref_logits, part[6], part[7])
        ref_sum, ref_w = ref_sum + s_sum, ref_w + s_w
    assert ref_w == packed_w
    packed, ref = packed_sum / packed_w, ref_sum / ref_w
    assert abs(packed - ref) <= 1e-5, (packed, ref)

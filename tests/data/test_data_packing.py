"""Packing: segment ids, positions, the in-segment shift, limits, images travelling with their
examples, first-fit sets, and exact resume of the packing iterator."""

from __future__ import annotations

import grain
import numpy as np

from data_test_helpers import color_of, decode_color, png_b64, segments, tok  # noqa: F401
from t5gemma2_jax.data import DataConfig, build_row, make_pipeline
from t5gemma2_jax.data import counters
from t5gemma2_jax.data.counters import Skip
from t5gemma2_jax.data.elements import Example
from t5gemma2_jax.data.packing import COUNTS_KEY, PackIterDataset, RowSet


def _ex(enc, tgt, images=0, w=None, size=2):
    return Example(encoder_ids=np.asarray(enc, np.int32), targets=np.asarray(tgt, np.int32),
                   loss_weights=np.ones(len(tgt), np.float32) if w is None else np.asarray(w, np.float32),
                   images=np.full((images, 3, size, size), images, np.float32), counts=counters.zeros())


def test_build_row_layout():
    a = _ex([2, 9, 11, 12], [20, 21, 1], images=1)
    b = _ex([2, 9, 13], [22, 1], w=[1, 0.5])
    row = build_row([a, b], encoder_length=10, decoder_length=7, max_images=3, image_size=2, bos=2)
    np.testing.assert_array_equal(row["encoder_input_ids"], [2, 9, 11, 12, 2, 9, 13, 0, 0, 0])
    np.testing.assert_array_equal(row["encoder_segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["encoder_positions"], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["decoder_target_ids"], [20, 21, 1, 22, 1, 0, 0])
    np.testing.assert_array_equal(row["decoder_input_ids"], [2, 20, 21, 2, 22, 0, 0])
    np.testing.assert_array_equal(row["decoder_segment_ids"], [1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(row["decoder_positions"], [0, 1, 2, 0, 1, 0, 0])
    np.testing.assert_array_equal(row["decoder_loss_weights"], [1, 1, 1, 1, 0.5, 0, 0])
    np.testing.assert_array_equal(row["image_mask"], [True, False, False])
    assert (row["pixel_values"][0] == 1).all() and (row["pixel_values"][1:] == 0).all()
    assert row[COUNTS_KEY][counters.counter_index("examples")] == 2
    assert {k: v.dtype.name for k, v in row.items() if k != COUNTS_KEY} == {
        "encoder_input_ids": "int32", "encoder_segment_ids": "int32", "encoder_positions": "int32",
        "decoder_input_ids": "int32", "decoder_target_ids": "int32",
        "decoder_loss_weights": "float32", "decoder_segment_ids": "int32",
        "decoder_positions": "int32", "pixel_values": "float32", "image_mask": "bool"}


def test_first_fit_respects_every_limit():
    rows = RowSet(num_bins=2, max_examples_per_row=None, encoder_length=10, decoder_length=6,
                  max_images=1, image_size=2, bos=2)
    assert rows.try_add(_ex([1] * 6, [1] * 2, images=1))
    assert rows.try_add(_ex([1] * 2, [1] * 2, images=1))  # image limit: second row
    assert rows.try_add(_ex([1] * 4, [1] * 4))  # fits row 0 (10 enc, 6 dec)
    assert not rows.try_add(_ex([1] * 9, [1]))  # fits nowhere (row 0 is full, 2 + 9 > 10 in row 1)
    assert [len(b) for b in rows.bins] == [2, 1]
    one = RowSet(num_bins=1, max_examples_per_row=1, encoder_length=10, decoder_length=6,
                 max_images=1, image_size=2, bos=2)
    assert one.try_add(_ex([1], [1])) and not one.try_add(_ex([1], [1]))


def _stream(n, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        if i % 7 == 3:
            items.append(Skip(counters.skip_delta("malformed_json")))
            continue
        e, t = int(rng.integers(1, 12)), int(rng.integers(1, 8))
        items.append(_ex(np.full(e, 100 + i), np.full(t, 100 + i), images=int(rng.integers(0, 2))))
    return items


def _packed(items, **kw):
    ds = grain.MapDataset.source(items).to_iter_dataset()
    return PackIterDataset(ds, encoder_length=16, decoder_length=10, max_images=2, image_size=2,
                           bos=2, num_bins=3, **kw)


def test_every_example_exactly_once_and_counts_preserved():
    items = _stream(200)
    rows = list(_packed(items))
    seen = []
    for row in rows:
        seg = row["encoder_segment_ids"]
        for s in range(1, seg.max() + 1):
            ids = set(row["encoder_input_ids"][seg == s].tolist())
            assert len(ids) == 1
            seen.append(ids.pop())
            assert set(row["decoder_target_ids"][row["decoder_segment_ids"] == s].tolist()) == {seen[-1]}
        assert row["image_mask"].sum() <= 2
    expected = [100 + i for i, x in enumerate(items) if isinstance(x, Example)]
    assert sorted(seen) == expected
    total = sum(r[COUNTS_KEY] for r in rows)
    assert total[counters.counter_index("examples")] == len(expected)
    assert total[counters.counter_index("skipped/malformed_json")] == sum(
        isinstance(x, Skip) for x in items)


def test_packing_iterator_resumes_exactly_at_every_step():
    items = _stream(120, seed=1)
    reference = list(_packed(items))
    it = iter(_packed(items))
    for step in range(len(reference)):
        state = it.get_state()
        fresh = iter(_packed(items))
        fresh.set_state(state)
        for k in range(min(3, len(reference) - step)):
            got = next(fresh)
            for key in got:
                np.testing.assert_array_equal(got[key], reference[step + k][key])
        next(it)


def test_only_bad_records_do_not_hang():
    items = [Skip(counters.skip_delta("malformed_json")) for _ in range(2000)]
    rows = list(_packed(items))
    assert all(r["encoder_segment_ids"].max() == 0 for r in rows)
    assert sum(r[COUNTS_KEY] for r in rows)[counters.counter_index("records_seen")] == 2000


def test_images_travel_with_their_examples(tok):
    # SFT: the image colour and the text both encode the record number.
    records = [{"messages": [
        {"role": "user", "content": f"item {i} <start_of_image> and <start_of_image>",
         "images": [png_b64(color_of(i)), png_b64(color_of(1000 + i))]} if i % 3 else
        {"role": "user", "content": f"item {i} without image"},
        {"role": "model", "content": f"answer {i}"}]} for i in range(40)]
    cfg = DataConfig(kind="sft", encoder_length=160, decoder_length=24, batch_size=4,
                     max_images_per_row=5, image_size=8, mm_tokens_per_image=4, packing_bins=4)
    found = {}
    for batch in make_pipeline(cfg, "eval", records=records):
        for r in range(4):
            images = batch["pixel_values"][r][batch["image_mask"][r]]
            assert not batch["pixel_values"][r][~batch["image_mask"][r]].any()
            used = 0
            for s, m in segments(batch, r).items():
                i = int(tok.decode(batch["decoder_target_ids"][r][m][:-1]).split()[-1])
                enc = batch["encoder_input_ids"][r][batch["encoder_segment_ids"][r] == s]
                k = int((enc == tok.special.boi).sum())
                assert int((enc == tok.special.image).sum()) == 4 * k
                assert [decode_color(x) for x in images[used:used + k]] == (
                    [i, 1000 + i] if i % 3 else [])
                used += k
                found[i] = True
            assert used == len(images)
    assert sorted(found) == list(range(40))


def test_images_are_held_compactly_and_restored_exactly(tok):
    from PIL import Image

    from t5gemma2_jax.data.images import compact, expand, load_pixels, preprocess_image, to_pixels
    from t5gemma2_jax.data.records import ParseRecord
    from t5gemma2_jax.data.sources import RawRecord

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (13, 21, 4), dtype=np.uint8)
    cases = [Image.fromarray(noise[..., :3]), Image.fromarray(noise),  # RGB, RGBA (alpha)
             Image.fromarray(noise[..., 0]), Image.fromarray(noise[..., :3]).convert("P")]
    for img in cases:
        for size in (8, 16, 21):
            held = to_pixels(img, size)
            assert held.dtype == np.uint8 and held.shape == (3, size, size)
            # Bit-exact with the reference preprocessing (the vision package's when present).
            assert expand(held).tobytes() == preprocess_image(img, size).tobytes()
    pixels = load_pixels(png_b64((200, 30, 90), size=20), None, 16)
    assert pixels.dtype == np.float32 and compact(pixels).dtype == np.uint8
    assert compact(pixels + np.float32(1e-3)).dtype == np.float32  # not from uint8: kept
    parser = ParseRecord(kind="pretrain", tokenizer=tok, names=["m"], base_dirs=[None],
                         image_size=16, mm_tokens_per_image=4, max_images=2)
    doc = parser.map_with_index(0, RawRecord(0, 1, {"text": "a", "images": [png_b64((1, 2, 3))]}))
    assert doc.images.dtype == np.uint8 and doc.images.shape == (1, 3, 16, 16)

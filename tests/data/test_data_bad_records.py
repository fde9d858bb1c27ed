"""Bad data is skipped, counted by reason, reaches the stats, and too much of it stops the run."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest

from data_test_helpers import png_b64
from t5gemma2_jax.data import DataConfig, DataQualityError, SKIP_REASONS, make_pipeline
from t5gemma2_jax.data.images import ImageError, load_image


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)


def _read_all(tmp_path, lines):
    """The config of one eval pass over `lines` (images on, nothing fatal), its batches and counters."""
    cfg = DataConfig(eval=_write(tmp_path / "data.jsonl", lines), train="unused", batch_size=2,
                     encoder_length=96, decoder_length=48, max_images_per_row=2, image_size=8,
                     mm_tokens_per_image=4, ul2_denoisers="R:3:0.15:1", max_bad_fraction=1.0)
    pipe = make_pipeline(cfg, "eval")
    return cfg, list(pipe), pipe.stats()


def test_every_reason_is_counted(tmp_path):
    good = png_b64((10, 200, 30))
    (tmp_path / "img.png").write_bytes(base64.b64decode(good.split(",", 1)[1]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [
        {"text": "a fine line."},
        {"text": "a fine line with a relative image path.", "images": ["img.png"]},
        "{not json",                                              # malformed_json
        "\xff\xfe",                                               # malformed_json
        "[1, 2, 3]",                                              # bad_schema
        {"text": 5},                                              # bad_schema
        {"messages": [{"role": "user", "content": "hi"}]},        # bad_schema (SFT in pretrain)
        {"text": "extra field", "id": 7},                         # unknown_field
        {"text": "   "},                                          # empty_text
        {"text": "x"},                                            # too_short (1 token)
        {"text": "missing", "images": ["nowhere/none.png"]},      # missing_image
        {"text": "broken", "images": ["broken.png"]},             # corrupt_image
        {"text": "bad b64", "images": ["data:image/png;base64,!!!"]},  # corrupt_image
        {"text": "<start_of_image> two markers <start_of_image>", "images": [good]},  # mismatch
        {"text": "three images", "images": [good, good, good]},   # too_many_images
        {"text": "word " * 300, "images": [good]},                # too_long (images: no split)
        {"text": "a sentinel <unused3> in text"},                 # reserved_token
        "",                                                       # blank: not a record
    ]
    cfg, batches, stats = _read_all(tmp_path, lines)
    assert stats["records_seen"] == 17 and stats["examples"] == 2
    expected = {"malformed_json": 2, "bad_schema": 3, "unknown_field": 1, "empty_text": 1,
                "too_short": 1, "missing_image": 1, "corrupt_image": 2, "image_marker_mismatch": 1,
                "too_many_images": 1, "too_long": 1, "reserved_token": 1}
    assert {r: stats[f"skipped/{r}"] for r in SKIP_REASONS if stats[f"skipped/{r}"]} == expected
    assert all(isinstance(v, int) for v in stats.values())
    assert sum(b["image_mask"].sum() for b in batches) == 1  # the relative path resolved

    lenient = make_pipeline(cfg.with_overrides({"unknown_fields": "ignore"}), "eval")
    list(lenient)
    assert lenient.stats()["skipped/unknown_field"] == 0 and lenient.stats()["examples"] == 3


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width x height`; its pixel data is never there."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + b"\x00" * 8  # Pillow reads up to the first IDAT before it knows the size
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 8) + idat + struct.pack(">I", zlib.crc32(idat)))


def test_a_decompression_bomb_is_a_counted_skip(tmp_path):
    bomb = _png_claiming(30_000, 30_000)  # 900 MP: refused from the header, before decoding
    with pytest.raises(ImageError, match="decompression bomb") as err:
        load_image(bomb)
    assert err.value.reason == "corrupt_image"
    (tmp_path / "bomb.png").write_bytes(bomb)
    bomb_uri = "data:image/png;base64," + base64.b64encode(bomb).decode()
    good = png_b64((10, 200, 30))
    lines = [
        {"text": "a fine line before.", "images": [good]},
        {"text": "a bomb on disk.", "images": ["bomb.png"]},
        {"text": "a fine line between."},
        {"text": "a bomb inline, next to a good image.", "images": [good, bomb_uri]},
        {"text": "a fine line after.", "images": [good]},
    ]
    cfg, batches, stats = _read_all(tmp_path, lines)
    assert stats["records_seen"] == 5 and stats["examples"] == 3
    assert stats["skipped/corrupt_image"] == 2
    assert sum(stats[f"skipped/{r}"] for r in SKIP_REASONS) == 2
    assert sum(b["image_mask"].sum() for b in batches) == 2


def test_max_bad_fraction_stops_the_run_with_a_clear_message(tmp_path):
    lines = [{"text": f"good line {i}."} if i % 2 else "{broken" for i in range(100)]
    cfg = DataConfig(train=_write(tmp_path / "t.jsonl", lines), encoder_length=64,
                     decoder_length=32, batch_size=2, max_images_per_row=0,
                     ul2_denoisers="R:3:0.15:1", max_bad_fraction=0.2, bad_fraction_min_records=40)
    pipe = make_pipeline(cfg, "train")
    with pytest.raises(DataQualityError) as err:
        for _ in range(200):
            next(pipe)
    msg = str(err.value)
    assert "data.max_bad_fraction=0.2" in msg and "skipped/malformed_json=" in msg
    assert pipe.stats()["records_seen"] >= 40

    ok = make_pipeline(cfg.with_overrides({"max_bad_fraction": "0.6"}), "train")
    for _ in range(30):
        next(ok)
    assert 0.4 < ok.stats()["skipped/malformed_json"] / ok.stats()["records_seen"] < 0.6


def test_a_source_of_only_bad_records_fails_instead_of_hanging(tmp_path):
    cfg = DataConfig(train=_write(tmp_path / "t.jsonl", ["{broken"] * 10), batch_size=2,
                     max_images_per_row=0, ul2_denoisers="S:1", bad_fraction_min_records=100)
    with pytest.raises(DataQualityError, match="malformed_json"):
        pipe = make_pipeline(cfg, "train")
        for _ in range(100):
            next(pipe)

"""Bad data is skipped, counted by reason, reaches the stats, and too much of it stops the run;
one bad record never ends a run, and is logged once however often it is read."""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest

from data_test_helpers import png_b64, tok  # noqa: F401  (fixture)
from t5gemma2_jax.data import (COUNTER_NAMES, DataConfig, DataQualityError, SKIP_REASONS,
                               make_pipeline, write_array_record)
from t5gemma2_jax.data import counters, tasks
from t5gemma2_jax.data.images import ImageError, load_image
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.data.ul2 import Denoiser, reconstruct


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


# ---- one record never ends a run; each bad record is logged once -----------------------------

@pytest.fixture
def fresh_skip_log():
    """Skips of earlier tests in this process used up the per-reason log limit."""
    counters.reset_skip_log()
    yield
    counters.reset_skip_log()


def _write_bytes(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def _text_cfg(**kw) -> DataConfig:
    base = dict(batch_size=2, encoder_length=96, decoder_length=48, max_images_per_row=0,
                ul2_denoisers="R:3:0.15:1", max_bad_fraction=1.0)
    return DataConfig(**{**base, **kw})


def _texts(batches, tok) -> list[str]:
    """The original text of every packed example (R denoisers: encoder = bos, mode, body)."""
    s, out = tok.special, []
    for batch in batches:
        for r in range(batch["encoder_input_ids"].shape[0]):
            eseg, dseg = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
            for seg in range(1, eseg.max() + 1):
                enc = batch["encoder_input_ids"][r][eseg == seg]
                tgt = batch["decoder_target_ids"][r][dseg == seg]
                out.append(tok.decode(reconstruct(enc[2:], tgt, s.sentinels, s.eos)))
    return out


def test_records_that_break_the_parser_or_a_transform_are_counted_skips(tmp_path, monkeypatch,
                                                                        tok, fresh_skip_log):
    real_encode, real_denoise = Tokenizer.encode, Denoiser.__call__
    breaks_denoiser = tok.encode("the denoiser breaks on this one.")

    def encode(self, text):
        if "the tokenizer breaks" in text:
            raise ValueError("tokenizer broke")
        return real_encode(self, text)

    def denoise(self, ids, *args, **kwargs):
        if np.array_equal(ids, breaks_denoiser):
            raise IndexError("denoiser broke")
        return real_denoise(self, ids, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", encode)
    monkeypatch.setattr(Denoiser, "__call__", denoise)
    lines = [
        b'{"text": "the first good line."}',
        b"[" * 100_000 + b"]" * 100_000,                          # malformed_json (too deep)
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,              # malformed_json (too deep)
        b'{"text": "invalid \xff utf-8"}',                        # malformed_json
        b'{"text": "an unpaired \\ud800 surrogate"}',             # malformed_json
        b'{"text": "the tokenizer breaks on this one."}',         # parse_error (parse stage)
        b'{"text": "the denoiser breaks on this one."}',          # parse_error (task stage)
        b'{"text": "the second good line."}',
    ]
    path = _write_bytes(tmp_path / "data.jsonl", lines)
    pipe = make_pipeline(_text_cfg(eval=path, train="unused"), "eval")
    batches = list(pipe)
    stats = pipe.stats()
    assert stats["records_seen"] == 8 and stats["examples"] == 2
    assert {r: stats[f"skipped/{r}"] for r in SKIP_REASONS if stats[f"skipped/{r}"]} == {
        "malformed_json": 4, "parse_error": 2}
    assert sorted(_texts(batches, tok)) == ["the first good line.", "the second good line."]
    summary = pipe.skip_summary()
    assert summary == (f"skipped 6 of 8 records: malformed_json 4 (first at {path}:2), "
                       f"parse_error 2 (first at {path}:6)")


def _break_the_tokenizer_on(word: str, monkeypatch) -> None:
    """Make the tokenizer raise on texts containing `word`: a transform failing on one record."""
    real_encode = Tokenizer.encode

    def encode(self, text):
        if word in text:
            raise ValueError("tokenizer broke")
        return real_encode(self, text)

    monkeypatch.setattr(Tokenizer, "encode", encode)


def test_skip_messages_say_what_went_wrong(tmp_path, monkeypatch, caplog, fresh_skip_log):
    _break_the_tokenizer_on("breaks", monkeypatch)
    lines = [b'{"text": "a good line."}', b"[" * 100_000 + b"]" * 100_000,
             b'{"text": "invalid \xff utf-8"}', b'{"text": "an unpaired \\udc00"}',
             b'{"text": "this breaks."}']
    path = _write_bytes(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="t5gemma2_jax.data"):
        list(make_pipeline(_text_cfg(eval=path, train="unused"), "eval"))
    logged = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records}
    assert "nested too deeply" in logged[f"{path}:2"]
    assert "not valid UTF-8" in logged[f"{path}:3"]
    assert "not valid Unicode" in logged[f"{path}:4"]
    assert "skipped/parse_error" in logged[f"{path}:5"]
    assert "ValueError: tokenizer broke" in logged[f"{path}:5"]


def test_an_sft_transform_that_raises_skips_only_its_record(monkeypatch, fresh_skip_log):
    real = tasks.sft_examples

    def sft_examples(conv, *args, **kwargs):
        if conv.origin == "memory:1":
            raise KeyError("turn")
        return real(conv, *args, **kwargs)

    monkeypatch.setattr(tasks, "sft_examples", sft_examples)
    records = [{"messages": [{"role": "user", "content": f"question {i}?"},
                             {"role": "model", "content": f"answer {i}."}]} for i in range(3)]
    pipe = make_pipeline(_text_cfg(kind="sft"), "eval", records=records)
    list(pipe)
    stats = pipe.stats()
    assert stats["records_seen"] == 3 and stats["examples"] == 2
    assert stats["skipped/parse_error"] == 1
    assert pipe.skip_summary() == "skipped 1 of 3 records: parse_error 1 (first at memory:1)"


def test_unreadable_records_are_counted_skips(tmp_path, monkeypatch, caplog, fresh_skip_log):
    path = tmp_path / "data.array_record"
    write_array_record(str(path), [{"text": f"good record number {i}."} for i in range(6)])
    data = bytearray(path.read_bytes())
    data[300:320] = b"\x00" * 20  # inside an early chunk: its checksum no longer matches
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="t5gemma2_jax.data"):
        pipe = make_pipeline(_text_cfg(eval=str(path), train="unused"), "eval")
        list(pipe)
    stats = pipe.stats()
    assert stats["records_seen"] == 6 and 1 <= stats["skipped/parse_error"] < 6
    assert stats["examples"] == 6 - stats["skipped/parse_error"]
    assert "cannot read the record: RuntimeError" in caplog.text

    jsonl = _write(tmp_path / "data.jsonl", [{"text": "line one."}, {"text": "line two."}])
    real_pread = os.pread
    second = len(b'{"text": "line one."}\n')

    def pread(fd, n, offset):
        if offset == second:
            raise OSError(5, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    pipe = make_pipeline(_text_cfg(eval=jsonl, train="unused"), "eval")
    list(pipe)
    assert pipe.stats()["skipped/parse_error"] == 1 and pipe.stats()["examples"] == 1
    assert pipe.skip_summary() == f"skipped 1 of 2 records: parse_error 1 (first at {jsonl}:2)"


def test_a_bad_line_is_logged_once_across_tasks_epochs_and_evaluations(tmp_path, caplog,
                                                                       fresh_skip_log):
    lines = [{"text": f"good line number {i} with some words."} for i in range(8)]
    lines.insert(3, "{broken")
    path = _write(tmp_path / "data.jsonl", lines)
    cfg = _text_cfg(train=path, eval=path, batch_size=4,
                    ul2_denoisers="R:3:0.15:0.4,X:3:0.5:0.3,S:0.3")
    with caplog.at_level(logging.WARNING, logger="t5gemma2_jax.data"):
        pipe = make_pipeline(cfg, "train")
        for _ in range(12):
            next(pipe)
        for _ in range(2):  # an evaluation re-reads its file
            list(make_pipeline(cfg, "eval"))
    # Each of the three task pipelines parsed the line, over several epochs.
    assert pipe.stats()["skipped/malformed_json"] > 3
    assert [r.getMessage() for r in caplog.records if f"{path}:4 " in r.getMessage()] == [
        f"skipping {path}:4 (skipped/malformed_json): malformed JSON: Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1)"]
    assert pipe.skip_summary().endswith(f"malformed_json {pipe.stats()['skipped/malformed_json']} "
                                        f"(first at {path}:4)")


def test_after_the_limit_a_reason_says_once_that_it_only_counts(tmp_path, monkeypatch, caplog,
                                                                fresh_skip_log):
    monkeypatch.setattr(counters, "LOG_LIMIT", 2)
    lines = ["{broken"] * 5 + [{"text": "a good line."}, {"text": "x"}]
    path = _write(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="t5gemma2_jax.data"):
        for _ in range(2):
            list(make_pipeline(_text_cfg(eval=path, train="unused"), "eval"))
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split()[1] for m in messages if m.startswith("skipping")] == [
        f"{path}:1", f"{path}:2", f"{path}:7"]
    notes = [m for m in messages if "only counted" in m]
    assert len(notes) == 1 and "skipped/malformed_json" in notes[0]


def test_the_summary_names_only_the_pipeline_s_own_files(tmp_path, fresh_skip_log):
    train = _write(tmp_path / "train.jsonl", [{"text": "a good line."}, "{broken", {"text": 5}])
    evals = _write(tmp_path / "eval.jsonl", ["{broken", {"text": "a good line."}])
    cfg = _text_cfg(train=train, eval=evals, shuffle=False)
    eval_pipe = make_pipeline(cfg, "eval")  # read first: its skip is the process's first
    list(eval_pipe)
    assert eval_pipe.skip_summary() == (f"skipped 1 of 2 records: malformed_json 1 "
                                        f"(first at {evals}:1)")
    train_pipe = make_pipeline(cfg, "train")
    for _ in range(3):
        next(train_pipe)
    stats, summary = train_pipe.stats(), train_pipe.skip_summary()
    skipped = stats["skipped/malformed_json"] + stats["skipped/bad_schema"]
    assert summary.startswith(f"skipped {skipped} of {stats['records_seen']} records: ")
    assert f"malformed_json {stats['skipped/malformed_json']} (first at {train}:2)" in summary
    assert f"bad_schema {stats['skipped/bad_schema']} (first at {train}:3)" in summary
    assert evals not in summary

    good = _write(tmp_path / "good.jsonl", [{"text": "a good line."}] * 3)
    clean = make_pipeline(cfg.with_overrides({"eval": good}), "eval")
    list(clean)
    assert clean.skip_summary() == "skipped 0 of 3 records"


def test_the_new_reason_is_appended_and_survives_a_restore(tmp_path, monkeypatch, fresh_skip_log):
    # Checkpointed counter vectors keep their layout: older reasons keep their positions.
    assert SKIP_REASONS[:12] == (
        "malformed_json", "bad_schema", "unknown_field", "empty_text", "too_short",
        "missing_image", "corrupt_image", "image_marker_mismatch", "too_many_images", "too_long",
        "reserved_token", "no_response")
    assert SKIP_REASONS[-1] == "parse_error" and COUNTER_NAMES[-1] == "skipped/parse_error"
    _break_the_tokenizer_on("breaks", monkeypatch)
    lines = [{"text": f"good line number {i} with some words."} for i in range(6)]
    lines.insert(2, {"text": "this one breaks the tokenizer."})
    cfg = _text_cfg(train=_write(tmp_path / "t.jsonl", lines), shuffle=False)
    pipe = make_pipeline(cfg, "train")
    for _ in range(4):
        next(pipe)
    state = json.loads(json.dumps(pipe.get_state()))
    assert state["counters"]["skipped/parse_error"] == pipe.stats()["skipped/parse_error"] > 0
    restored = make_pipeline(cfg, "train")
    restored.set_state(state)
    assert restored.stats() == pipe.stats()
    np.testing.assert_equal(next(restored), next(pipe))

    old = dict(state, counters={k: v for k, v in state["counters"].items()
                                if k != "skipped/parse_error"})
    older = make_pipeline(cfg, "train")
    older.set_state(old)  # a checkpoint written before the reason existed
    assert older.stats()["skipped/parse_error"] == 0
    assert older.stats()["records_seen"] == state["counters"]["records_seen"]


@pytest.mark.parametrize("stage", ["parse", "task"])
def test_memory_errors_are_not_taken_for_bad_records(tmp_path, monkeypatch, stage):
    """Running out of memory is the process's problem, not the record's: it must not be counted
    and skipped over (every later record would fail the same way)."""
    real_encode = Tokenizer.encode

    def encode(self, text):
        if stage == "parse" and "the record" in text:
            raise MemoryError
        return real_encode(self, text)

    def denoise(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Tokenizer, "encode", encode)
    if stage == "task":
        monkeypatch.setattr(Denoiser, "__call__", denoise)
    path = _write(tmp_path / "data.jsonl", [{"text": "the record."}])
    pipe = make_pipeline(_text_cfg(eval=path, train="unused"), "eval")
    with pytest.raises(MemoryError):
        next(pipe)

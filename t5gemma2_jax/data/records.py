"""Parse stage: a raw record -> a tokenized `Document` / `Conversation`, or a counted `Skip`.

Schemas (one JSON object per line / record):
  pretrain: {"text": str, "images": [ref, ...]}    images optional; `<start_of_image>` in the
            text marks where each image goes (as many markers as images), else they come first.
  sft:      {"messages": [{"role": "user"|"model", "content": str, "images": [ref, ...]}, ...],
             "answers": [str, ...]}   answers optional: the accepted answers evaluation scores against
            "assistant" is accepted for "model"; a leading "system" message is merged into the
            first user turn (Gemma has no system role); images only in user turns.
A field not in the schema skips the record (`skipped/unknown_field`) unless
data.unknown_fields="ignore". This stage runs in Grain workers: it decodes images and tokenizes.

Whatever goes wrong with one record is that record's skip, never the run's end: a record that
fails in a way no check anticipated (a library limit, a bug) is `skipped/parse_error` with the
exception in the message. Only MemoryError, KeyboardInterrupt and SystemExit get through: they
say something about the process, not the record.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import grain
import numpy as np

from t5gemma2_jax.data import counters
from t5gemma2_jax.data.counters import error_skip, make_skip
from t5gemma2_jax.data.elements import Conversation, Document, Turn
from t5gemma2_jax.data.images import ImageError, concat, load_pixels
from t5gemma2_jax.data.sft import ChatTemplate
from t5gemma2_jax.data.sources import RawRecord, Unreadable
from t5gemma2_jax.data.tokenizer import IMAGE_MARKER, Tokenizer

PRETRAIN_FIELDS = frozenset({"text", "images"})
# `answers`: every accepted answer of an image-question record (evaluation scores against them;
# training reads the model turn)
SFT_FIELDS = frozenset({"messages", "answers"})
MESSAGE_FIELDS = frozenset({"role", "content", "images"})
ROLES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}


class BadRecord(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ParseRecord(grain.transforms.MapWithIndex):
    """`map_with_index(index, RawRecord) -> Document | Conversation | Skip`."""

    def __init__(self, *, kind: str, tokenizer: Tokenizer, names: Sequence[str],
                 base_dirs: Sequence[str | None], image_size: int, mm_tokens_per_image: int,
                 max_images: int, unknown_fields: str = "skip", process_index: int = 0,
                 process_count: int = 1):
        self.kind = kind
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = tokenizer
        self.names = list(names)
        self.base_dirs = list(base_dirs)
        self.image_size = image_size
        self.max_images = max_images
        self.unknown_fields = unknown_fields
        self.image_block = tokenizer.image_block(mm_tokens_per_image)
        self.template = ChatTemplate(tokenizer)

    def origin(self, raw: RawRecord) -> str:
        name = self.names[raw.source] if 0 <= raw.source < len(self.names) else "?"
        return f"{name}:{raw.line}"

    def map_with_index(self, index: int, raw: RawRecord):
        # Unique across hosts (each host indexes its own shard from 0): seeds per-example RNG.
        index = index * self.process_count + self.process_index
        origin = self.origin(raw)
        if isinstance(raw.payload, Unreadable):
            return make_skip("parse_error", origin, f"cannot read the record: {raw.payload.error}")
        try:
            obj = decode_record(raw.payload)
            base_dir = self.base_dirs[raw.source] if raw.source < len(self.base_dirs) else None
            if self.kind == "pretrain":
                return self._document(index, origin, obj, base_dir)
            return self._conversation(index, origin, obj, base_dir)
        except (BadRecord, ImageError) as e:
            return make_skip(e.reason, origin, str(e))
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever one record trips costs only that record
            return error_skip(origin, e)

    # ---- pretraining ----------------------------------------------------------------------
    def _document(self, index: int, origin: str, obj: dict, base_dir) -> Document:
        if "messages" in obj and "text" not in obj:
            raise BadRecord("bad_schema", "an SFT record ('messages') in a pretraining dataset "
                                          "(set data.kind=sft)")
        self._check_fields(obj, PRETRAIN_FIELDS, "record")
        text = obj.get("text")
        if not isinstance(text, str):
            raise BadRecord("bad_schema", f"'text' must be a string, got {type(text).__name__}")
        refs = _image_refs(obj.get("images"), "images")
        text, refs, dropped = self._maybe_drop_images(text, refs)
        parts, anchors_parts = self._split_markers(text, refs)
        if not "".join(parts).strip():
            raise BadRecord("empty_text", "empty text")
        ids = [self._encode(p) for p in parts]
        text_ids = _concat_ids(ids)
        if self.tokenizer.has_reserved(text_ids):
            raise BadRecord("reserved_token", "text contains a reserved token (sentinel, mode, "
                                              "image or turn marker)")
        lens = np.cumsum([len(x) for x in ids])
        anchors = (np.zeros(len(refs), np.int64) if not anchors_parts
                   else lens[:-1].astype(np.int64))
        images = self._load_images(refs, base_dir)
        return Document(index=index, origin=origin, text_ids=text_ids, image_anchors=anchors,
                        images=images, counts=counters.delta(records_seen=1,
                                                             images_dropped=dropped))

    # ---- SFT ------------------------------------------------------------------------------
    def _conversation(self, index: int, origin: str, obj: dict, base_dir) -> Conversation:
        if "text" in obj and "messages" not in obj:
            raise BadRecord("bad_schema", "a pretraining record ('text') in an SFT dataset "
                                          "(set data.kind=pretrain)")
        self._check_fields(obj, SFT_FIELDS, "record")
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRecord("bad_schema", "'messages' must be a non-empty list")
        parsed = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BadRecord("bad_schema", f"message {i} is not an object")
            self._check_fields(m, MESSAGE_FIELDS, f"message {i}")
            role = ROLES.get(m.get("role"))
            content = m.get("content")
            if role is None:
                raise BadRecord("bad_schema", f"message {i}: role must be one of {sorted(ROLES)}")
            if not isinstance(content, str):
                raise BadRecord("bad_schema", f"message {i}: 'content' must be a string")
            refs = _image_refs(m.get("images"), f"message {i} images")
            if role == "system" and i != 0:
                raise BadRecord("bad_schema", "a system message must come first")
            if role in ("model", "system") and refs:
                raise BadRecord("bad_schema", f"message {i}: images in a {role} turn")
            parsed.append([role, content, refs])
        if parsed[0][0] == "system":  # Gemma 3 style: system text opens the first user turn
            _, sys_content, _ = parsed.pop(0)
            if parsed and parsed[0][0] == "user":
                parsed[0][1] = sys_content + "\n\n" + parsed[0][1]
            else:
                parsed.insert(0, ["user", sys_content, []])
        turns, dropped = [], 0
        for role, content, refs in parsed:
            content, refs, d = self._maybe_drop_images(content, refs)
            dropped += d
            parts, marked = self._split_markers(content, refs)
            ids = [self._encode(p) for p in parts]
            if any(self.tokenizer.has_reserved(x) for x in ids):
                raise BadRecord("reserved_token", "content contains a reserved token")
            block = self.image_block
            if marked:  # part, image, part, image, ..., part
                pieces = [x for j, p in enumerate(ids) for x in ((p, block) if j < len(refs) else (p,))]
            else:
                pieces = [block] * len(refs) + ids
            content_ids = _concat_ids(pieces)
            turns.append(Turn(
                role=role, rendered=self.template.render_turn(role, content_ids),
                target=content_ids if role == "model" else None,
                images=self._load_images(refs, base_dir)))
        return Conversation(index=index, origin=origin, turns=turns,
                            counts=counters.delta(records_seen=1, images_dropped=dropped))

    # ---- helpers --------------------------------------------------------------------------
    def _encode(self, text: str) -> np.ndarray:
        try:
            return self.tokenizer.encode(text)
        except Exception:
            # A JSON escape such as "\ud800" yields a lone surrogate, which SentencePiece
            # rejects with an opaque message; name the actual problem. Checked only on failure,
            # so well-formed text is not encoded twice.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRecord("malformed_json", f"text is not valid Unicode ({e.reason} at "
                                                  f"character {e.start})") from None
            raise

    def _check_fields(self, obj: dict, allowed: frozenset, what: str) -> None:
        unknown = set(obj) - allowed
        if unknown and self.unknown_fields == "skip":
            raise BadRecord("unknown_field", f"{what} has unknown field(s) {sorted(unknown)} "
                                             "(set data.unknown_fields=ignore to accept)")

    def _maybe_drop_images(self, text: str, refs: list[str]) -> tuple[str, list[str], int]:
        if self.max_images > 0 or not (refs or IMAGE_MARKER in text):
            return text, refs, 0
        return text.replace(IMAGE_MARKER, ""), [], len(refs)

    def _split_markers(self, text: str, refs: list[str]) -> tuple[list[str], bool]:
        """Text parts around the markers, and whether markers place the images."""
        n = text.count(IMAGE_MARKER)
        if n == 0:
            return [text], False
        if n != len(refs):
            raise BadRecord("image_marker_mismatch",
                            f"{n} {IMAGE_MARKER} markers but {len(refs)} images")
        return text.split(IMAGE_MARKER), True

    def _load_images(self, refs: list[str], base_dir) -> np.ndarray:
        if len(refs) > self.max_images > 0:
            raise BadRecord("too_many_images",
                            f"{len(refs)} images > data.max_images_per_row={self.max_images}")
        pixels = [load_pixels(ref, base_dir, self.image_size, compact_ok=True) for ref in refs]
        return concat([p[None] for p in pixels], self.image_size)


def decode_record(payload: Any) -> dict:
    """A record's JSON object; BadRecord ("malformed_json" / "bad_schema") naming what is wrong."""
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, (bytes, bytearray, memoryview)):
        # Strict UTF-8 (json.loads on bytes would guess UTF-16/32 and let encoded surrogates
        # through); "utf-8-sig" keeps accepting a byte-order mark on a file's first line.
        try:
            payload = bytes(payload).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadRecord("malformed_json", f"not valid UTF-8: {e}") from None
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise BadRecord("malformed_json", f"malformed JSON: {e}") from None
    except RecursionError:  # the C parser recurses once per level of nesting
        raise BadRecord("malformed_json", "JSON nested too deeply to parse (deeper than the "
                                          f"recursion limit, {sys.getrecursionlimit()})") from None
    if not isinstance(obj, dict):
        raise BadRecord("bad_schema", f"a record must be a JSON object, got {type(obj).__name__}")
    return obj


def _image_refs(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRecord("bad_schema", f"'{what}' must be a list of strings")
    return list(value)


def _concat_ids(pieces: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)

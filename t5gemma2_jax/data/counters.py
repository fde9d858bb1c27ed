"""Data-quality counters that travel with the data.

Bad records are dropped deep inside the pipeline, possibly in a Grain worker process, where no
counter in the trainer's process can be incremented. So every element carries a small int64
vector of counter *deltas*; a packed row sums the deltas of what went into it, a batch stacks
them, and the `DataPipeline` in the trainer's process adds them up. The totals therefore count
exactly the data the trainer consumed, and they are saved and restored with the iterator state.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("t5gemma2_jax.data")
LOG_LIMIT = 5  # logged skips per reason and process; the rest are only counted

# Why a record (or one example made from it) was dropped. The order fixes the vector layout,
# which is saved in checkpoints: append new reasons at the end, never reorder or remove.
SKIP_REASONS: tuple[str, ...] = (
    "malformed_json",  # not valid UTF-8 JSON, nested too deeply to parse, or non-Unicode text
    "bad_schema",  # not an object, wrong field types, bad roles, no text field
    "unknown_field",  # a field the schema does not know (with data.unknown_fields=skip)
    "empty_text",  # nothing to learn from: empty text or empty model response
    "too_short",  # a text too short for the denoiser (span corruption needs >= 2 tokens)
    "missing_image",  # an image path that does not exist
    "corrupt_image",  # bytes that PIL cannot decode
    "image_marker_mismatch",  # number of <start_of_image> markers != number of images
    "too_many_images",  # more images than data.max_images_per_row
    "too_long",  # longer than the encoder/decoder limits after the configured policy
    "reserved_token",  # the text encodes to a sentinel/mode/image/turn id (ambiguous targets)
    "no_response",  # an SFT conversation without a model turn
    "parse_error",  # any other failure while reading or processing one record (a bug or a
                    # library's limit that one record hits; the message names the exception)
)

# Other counters (not skips). `records_seen` is the denominator of the bad fraction.
OTHER_COUNTERS: tuple[str, ...] = (
    "records_seen",  # raw records read from the source (good or bad)
    "examples",  # examples placed into rows (a long document split in 3 counts 3)
    "documents_split",  # pretraining documents split into several examples (not truncated)
    "sft_turns_dropped",  # oldest turns dropped from SFT prompts (data.sft_truncation=drop_turns)
    "images_dropped",  # images ignored because data.max_images_per_row == 0
)

COUNTER_NAMES: tuple[str, ...] = OTHER_COUNTERS + tuple(f"skipped/{r}" for r in SKIP_REASONS)
NUM_COUNTERS = len(COUNTER_NAMES)
_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}


def counter_index(name: str) -> int:
    """Position of a counter ('records_seen' or 'skipped/<reason>') in the delta vector."""
    return _INDEX[name]


def zeros() -> np.ndarray:
    return np.zeros(NUM_COUNTERS, np.int64)


def delta(**named: int) -> np.ndarray:
    """A delta vector; `skipped_<reason>=n` or `<other>=n` keyword names."""
    d = zeros()
    for key, value in named.items():
        name = key.replace("skipped_", "skipped/", 1) if key.startswith("skipped_") else key
        d[_INDEX[name]] += value
    return d


def skip_delta(reason: str, records: int = 1) -> np.ndarray:
    """Delta for one dropped item; `records` is 1 when it is a whole raw record."""
    if reason not in SKIP_REASONS:
        raise KeyError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
    d = zeros()
    d[_INDEX[f"skipped/{reason}"]] = 1
    d[_INDEX["records_seen"]] = records
    return d


def as_dict(vector: np.ndarray) -> dict[str, int]:
    return {name: int(v) for name, v in zip(COUNTER_NAMES, vector)}


def from_dict(values: dict[str, int]) -> np.ndarray:
    """Inverse of `as_dict`; unknown names are ignored so old checkpoints still load."""
    v = zeros()
    for name, value in values.items():
        if name in _INDEX:
            v[_INDEX[name]] = int(value)
    return v


def total_skipped(vector: np.ndarray) -> int:
    return int(vector[len(OTHER_COUNTERS):].sum())


@dataclass
class Skip:
    """A pipeline element standing for dropped data: it carries only its counter deltas.

    It flows through the same stages as real examples so that its counts reach the packer,
    which folds them into the next row it emits.
    """

    counts: np.ndarray
    origin: str = ""
    message: str = ""


def make_skip(reason: str, origin: str, message: str, *, records: int = 1,
              counts: np.ndarray | None = None) -> Skip:
    """A `Skip` for `reason`, logged with its origin (see `SkipLog`).

    `records=1` when a whole raw record is dropped, 0 for one example made from a record;
    `counts` are added (e.g. the record's own counts)."""
    _SKIP_LOG.note(reason, origin, message)
    d = skip_delta(reason, records=records)
    return Skip(d if counts is None else d + counts, origin, message)


def error_skip(origin: str, error: BaseException, *, records: int = 1,
               counts: np.ndarray | None = None) -> Skip:
    """A `parse_error` skip for an exception nobody anticipated, so that one record that trips
    a bug or a library limit costs that record, not the run. The message keeps the exception's
    type, which is what tells a data problem from a code problem."""
    return make_skip("parse_error", origin, f"{type(error).__name__}: {error}",
                     records=records, counts=counts)


def origin_file(origin: str) -> str:
    """The file part of a `file:line` origin (file names may contain ':')."""
    return origin.rpartition(":")[0]


class SkipLog:
    """Which skips this process has logged, and where each reason was first seen.

    The same record is parsed several times in one process (once per UL2 task in training,
    again at every evaluation, again every epoch), so logging each skip would repeat the same
    lines; an origin is logged once, at most `LOG_LIMIT` origins per reason, and a reason that
    reaches its limit says once that the rest are only counted. The first origin of each reason
    per file feeds `DataPipeline.skip_summary`; it is kept per file so that a pipeline names
    only its own files when train and eval pipelines share the process. All of it is
    process-local (Grain workers keep their own) and is not checkpointed: the counters are the
    record, this is only a pointer to an example. Several task pipelines parse in their own
    threads, hence the lock (held while logging, so a reason's lines come out in order).
    """

    def __init__(self):
        self._new_lock()
        self.reset()

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._logged_origins: set[str] = set()
            self._logged: Counter = Counter()
            self._capped: set[str] = set()
            self._first: dict[str, dict[str, str]] = {}  # reason -> {file: first origin}

    def note(self, reason: str, origin: str, message: str) -> None:
        with self._lock:
            self._first.setdefault(reason, {}).setdefault(origin_file(origin), origin)
            if origin in self._logged_origins:
                return
            if self._logged[reason] < LOG_LIMIT:
                self._logged[reason] += 1
                self._logged_origins.add(origin)
                log.warning("skipping %s (skipped/%s): %s", origin, reason, message)
            elif reason not in self._capped:
                self._capped.add(reason)
                log.warning("%d skipped/%s records were logged; further ones in this process "
                            "are only counted (DataPipeline.stats(), skip_summary())",
                            LOG_LIMIT, reason)

    def first_origin(self, reason: str, files: set[str] | None = None) -> str | None:
        """The first origin of `reason` seen in this process, among `files` if given."""
        with self._lock:
            for file, origin in self._first.get(reason, {}).items():
                if files is None or file in files:
                    return origin
        return None


_SKIP_LOG = SkipLog()
# A child forked while a parse thread held the lock would otherwise never get it.
os.register_at_fork(after_in_child=_SKIP_LOG._new_lock)


def first_skip_origin(reason: str, files: set[str] | None = None) -> str | None:
    return _SKIP_LOG.first_origin(reason, files)


def reset_skip_log() -> None:
    """Forget what was logged: a long-lived process (a notebook, a test session) that starts
    over on new data gets its first skips logged again."""
    _SKIP_LOG.reset()

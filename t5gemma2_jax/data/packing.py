"""Packing encoder-decoder examples into fixed-shape rows.

A row holds examples 1..n as segments: example i's encoder tokens carry encoder segment id i
and its decoder tokens decoder segment id i, positions restart at 0 in every segment, and 0 is
padding. The model's merged attention lets a decoder token see the earlier decoder tokens of its
own segment and the encoder tokens with the same segment id, so packed examples cannot see each
other. Decoder inputs are the targets shifted right *within* each segment, with bos (the decoder
start token) first. An example's images move with it: the row's images are in the order of
their placeholder blocks in the row's encoder tokens.

Packing algorithm (deterministic, so resume is exact): `num_bins` rows are filled at once; each
example goes to the first row where its encoder tokens, decoder tokens and images all fit. When
one does not fit anywhere, all rows are emitted and it opens a new set. The iterator's state is
the parent's state at the start of the set being emitted plus how many of its rows were
emitted; restoring re-reads that set (at most `num_bins` rows of examples).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from grain import DatasetIterator, IterDataset

from t5gemma2_jax.data import counters
from t5gemma2_jax.data.counters import Skip
from t5gemma2_jax.data.elements import Example
from t5gemma2_jax.data.images import expand

# After this many skipped items in a row the rows held so far are emitted (an all-padding row
# if there are none), so that a stretch of bad data surfaces in the counters
# (data.max_bad_fraction) instead of stalling the pipeline.
SKIPS_BEFORE_EMPTY_ROW = 512

BATCH_KEYS = ("encoder_input_ids", "encoder_segment_ids", "encoder_positions",
              "decoder_input_ids", "decoder_target_ids", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions")
IMAGE_KEYS = ("pixel_values", "image_mask")
COUNTS_KEY = "_counts"  # removed by DataPipeline; summed into its stats


def batch_shapes(rows: int, *, encoder_length: int, decoder_length: int, max_images: int,
                 image_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of a batch of `rows` rows, as `stack_rows` gives it."""
    i32 = np.dtype(np.int32)
    out = {k: ((rows, encoder_length if k.startswith("encoder") else decoder_length),
               np.dtype(np.float32) if k == "decoder_loss_weights" else i32) for k in BATCH_KEYS}
    if max_images > 0:
        out["pixel_values"] = ((rows, max_images, 3, image_size, image_size), np.dtype(np.float32))
        out["image_mask"] = ((rows, max_images), np.dtype(bool))
    return out


def build_row(examples: Sequence[Example], *, encoder_length: int, decoder_length: int,
              max_images: int, image_size: int, bos: int, counts: np.ndarray | None = None,
              compact_images: bool = False) -> dict[str, np.ndarray]:
    """One packed row from examples that fit (see the module docstring for the layout).

    With `compact_images` the pixels stay uint8 when all of the row's images are held that way
    (`stack_rows` turns them into float32 once per batch: 4x less memory traffic)."""
    S, T = encoder_length, decoder_length
    row = {
        "encoder_input_ids": np.zeros(S, np.int32), "encoder_segment_ids": np.zeros(S, np.int32),
        "encoder_positions": np.zeros(S, np.int32), "decoder_input_ids": np.zeros(T, np.int32),
        "decoder_target_ids": np.zeros(T, np.int32),
        "decoder_loss_weights": np.zeros(T, np.float32),
        "decoder_segment_ids": np.zeros(T, np.int32), "decoder_positions": np.zeros(T, np.int32),
    }
    if max_images > 0:
        stay_compact = compact_images and all(ex.images.dtype == np.uint8 for ex in examples)
        row["pixel_values"] = np.zeros((max_images, 3, image_size, image_size),
                                       np.uint8 if stay_compact else np.float32)
        row["image_mask"] = np.zeros(max_images, bool)
    total = counters.zeros() if counts is None else counts.copy()
    e = d = m = 0
    for seg, ex in enumerate(examples, start=1):
        n, t, k = len(ex.encoder_ids), len(ex.targets), ex.num_images
        if e + n > S or d + t > T or m + k > max_images:
            raise ValueError(f"examples do not fit one row: encoder {e + n}/{S}, "
                             f"decoder {d + t}/{T}, images {m + k}/{max_images}")
        row["encoder_input_ids"][e:e + n] = ex.encoder_ids
        row["encoder_segment_ids"][e:e + n] = seg
        row["encoder_positions"][e:e + n] = np.arange(n)
        row["decoder_target_ids"][d:d + t] = ex.targets
        row["decoder_input_ids"][d] = bos
        row["decoder_input_ids"][d + 1:d + t] = ex.targets[:-1]
        row["decoder_loss_weights"][d:d + t] = ex.loss_weights
        row["decoder_segment_ids"][d:d + t] = seg
        row["decoder_positions"][d:d + t] = np.arange(t)
        if k:
            row["pixel_values"][m:m + k] = ex.images if stay_compact else expand(ex.images)
            row["image_mask"][m:m + k] = True
        e, d, m = e + n, d + t, m + k
        total += ex.counts
    total[counters.counter_index("examples")] += len(examples)
    row[COUNTS_KEY] = total
    return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Grain batch function: stacks rows; pixels become float32 with unused slots zero."""
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "pixel_values"}
    if "pixel_values" in rows[0]:
        pixels = [r["pixel_values"] for r in rows]
        if all(p.dtype == np.uint8 for p in pixels):
            pv = expand(np.stack(pixels))  # one float32 write for the whole batch
        else:
            pv = np.stack([expand(p) for p in pixels])
        pv[~batch["image_mask"]] = 0.0
        batch["pixel_values"] = pv
    return batch


class RowSet:
    """`num_bins` rows being filled first-fit."""

    def __init__(self, *, num_bins: int, max_examples_per_row: int | None, **row_kw: Any):
        self.num_bins = num_bins
        self.max_examples = max_examples_per_row
        self.row_kw = row_kw
        self.S, self.T = row_kw["encoder_length"], row_kw["decoder_length"]
        self.M = row_kw["max_images"]
        self.bins: list[list[Example]] = []
        self.used: list[list[int]] = []  # [encoder, decoder, images] per bin
        self.extra: list[np.ndarray] = []  # counts of skipped items attached to each bin

    def try_add(self, ex: Example, extra_counts: np.ndarray | None = None) -> bool:
        need = (len(ex.encoder_ids), len(ex.targets), ex.num_images)
        if need[0] > self.S or need[1] > self.T or need[2] > self.M:
            raise ValueError(f"an example ({need}) exceeds the row limits "
                             f"({self.S}, {self.T}, {self.M}); the task stage must skip it")
        for b, used in enumerate(self.used):
            if self.max_examples is not None and len(self.bins[b]) >= self.max_examples:
                continue
            if used[0] + need[0] <= self.S and used[1] + need[1] <= self.T and used[2] + need[2] <= self.M:
                break
        else:
            if len(self.bins) == self.num_bins:
                return False
            b = len(self.bins)
            self.bins.append([])
            self.used.append([0, 0, 0])
            self.extra.append(counters.zeros())
        self.bins[b].append(ex)
        for i in range(3):
            self.used[b][i] += need[i]
        if extra_counts is not None:
            self.extra[b] += extra_counts
        return True

    def rows(self, trailing_counts: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """The rows; `trailing_counts` (skips after the last example) go to the last row. With
        no example at all this is one all-padding row that carries the counts."""
        rows = [build_row(b, counts=c, compact_images=True, **self.row_kw)
                for b, c in zip(self.bins, self.extra)]
        if not rows:
            rows = [build_row([], compact_images=True, **self.row_kw)]
        if trailing_counts is not None:
            rows[-1][COUNTS_KEY] += trailing_counts
        return rows


class PackIterDataset(IterDataset):
    """Example | Skip stream -> packed row dicts (each with a `_counts` vector).

    The counts of skipped items travel with the next example (so counters advance in step
    with the data actually emitted)."""

    def __init__(self, parent: IterDataset, *, encoder_length: int, decoder_length: int,
                 max_images: int, image_size: int, bos: int, num_bins: int,
                 max_examples_per_row: int | None = None):
        super().__init__(parent)
        self.set_kw = dict(num_bins=num_bins, max_examples_per_row=max_examples_per_row,
                           encoder_length=encoder_length, decoder_length=decoder_length,
                           max_images=max_images, image_size=image_size, bos=bos)

    def __iter__(self) -> DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self.set_kw)

    def __str__(self) -> str:
        return f"PackIterDataset({self.set_kw})"


class _PackIterator(DatasetIterator):
    def __init__(self, parent: DatasetIterator, set_kw: dict):
        super().__init__(parent)
        self._set_kw = set_kw
        self._reset()

    def _reset(self) -> None:
        self._building: RowSet | None = None
        self._ready: list[dict] | None = None
        self._next_row = 0
        # Parent state from which the set being emitted (or, if none, the set being built,
        # with any skips before it) is rebuilt by re-reading.
        self._emit_start = self._parent.get_state()
        self._building_start = None  # the same for `_building`, while a set is being emitted
        self._pending = counters.zeros()  # skips since the last example
        self._num_pending = 0
        self._pending_start = None  # parent state before the first pending skip

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._emit_start, "next_row": self._next_row}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._reset()
        self._next_row = int(state["next_row"])

    def _take_pending(self) -> np.ndarray:
        pending, self._pending, self._num_pending = self._pending, counters.zeros(), 0
        return pending

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._ready is not None:
            row = self._ready[self._next_row]
            self._next_row += 1
            if self._next_row >= len(self._ready):
                self._ready, self._next_row = None, 0
                self._emit_start = self._building_start
            return row
        while True:
            before = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                if self._building is None and not self._num_pending:
                    raise
                self._flush(before)
                return next(self)
            if isinstance(element, Skip):
                if not self._num_pending:
                    self._pending_start = before
                self._pending += element.counts
                self._num_pending += 1
                if self._num_pending >= SKIPS_BEFORE_EMPTY_ROW:
                    self._flush(self._parent.get_state())
                    return next(self)
                continue
            start = self._pending_start if self._num_pending else before
            pending = self._take_pending()
            if self._building is None:
                self._building = RowSet(**self._set_kw)
            if not self._building.try_add(element, pending):
                full = self._building
                self._building = RowSet(**self._set_kw)
                self._building.try_add(element, pending)
                self._ready = full.rows()
                self._building_start = start
                return next(self)

    def _flush(self, next_start) -> None:
        """Emit everything held (the rows being built, or one empty row) with pending skips."""
        self._ready = (self._building or RowSet(**self._set_kw)).rows(self._take_pending())
        self._building = None
        self._building_start = next_start

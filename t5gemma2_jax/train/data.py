"""Batch sources for the trainer: the Grain pipeline of `t5gemma2_jax.data`, or synthetic batches.

Both yield this process' rows as dicts of numpy arrays with the pipeline's keys, and have
`get_state()` / `set_state()` (JSON) and `stats()`. Synthetic batches are deterministic functions
of (seed, process, index) forming a learnable copy task: the decoder reproduces the encoder's
first tokens. They serve benchmarks (`train.data_source=synthetic`) and tests.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.data.config import DataConfig


class SyntheticBatches(Iterator[dict[str, np.ndarray]]):
    def __init__(self, data: DataConfig, model: T5Gemma2Config, *, split: str = "train",
                 process_index: int = 0, process_count: int = 1, eval_batches: int = 4):
        self.cfg, self.model = data, model
        self.rows = data.per_host_batch_size(process_count)
        self.salt = (0 if split == "train" else 1, process_index)
        self.limit = None if split == "train" else eval_batches
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.limit is not None and self.index >= self.limit:
            raise StopIteration
        rng = np.random.default_rng([self.cfg.seed, *self.salt, self.index])
        self.index += 1
        return make_batch(rng, self.rows, self.cfg.encoder_length, self.cfg.decoder_length, self.model,
                          max_images=self.cfg.max_images_per_row if self.model.with_vision else 0)

    def get_state(self) -> dict[str, Any]:
        return {"synthetic_index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["synthetic_index"])

    def stats(self) -> dict[str, int]:
        return {"batches": self.index}

    def close(self) -> None:
        pass


def make_batch(rng: np.random.Generator, B: int, S: int, T: int, model: T5Gemma2Config,
               max_images: int = 0) -> dict[str, np.ndarray]:
    """A packed-looking batch: two segments per row, some padding, an optional image per row."""
    V = model.vocab_size
    lo = 16 if V > 64 else 1  # keep clear of special tokens
    enc = np.zeros((B, S), np.int32)
    eseg = np.zeros((B, S), np.int32)
    epos = np.zeros((B, S), np.int32)
    din = np.zeros((B, T), np.int32)
    tgt = np.zeros((B, T), np.int32)
    w = np.zeros((B, T), np.float32)
    dseg = np.zeros((B, T), np.int32)
    dpos = np.zeros((B, T), np.int32)
    M = model.mm_tokens_per_image
    image_mask = np.zeros((B, max_images), bool)
    for b in range(B):
        e_used = d_used = 0
        for seg in (1, 2):
            n = int(rng.integers(max(2, S // 4), S // 2 + 1))
            t = int(min(n, rng.integers(max(2, T // 4), T // 2 + 1)))
            toks = rng.integers(lo, V, n).astype(np.int32)
            start = 0
            if seg == 1 and max_images and n >= M + 2 and rng.random() < 0.75:
                toks[:M + 2] = [model.boi_token_id] + [model.image_token_id] * M + [model.eoi_token_id]
                image_mask[b, 0] = True
                start = M + 2
            enc[b, e_used:e_used + n] = toks
            eseg[b, e_used:e_used + n] = seg
            epos[b, e_used:e_used + n] = np.arange(n)
            target = np.resize(toks[start:] if n > start else toks, t)
            tgt[b, d_used:d_used + t] = target
            din[b, d_used:d_used + t] = np.concatenate([[model.bos_token_id], target[:-1]])
            w[b, d_used:d_used + t] = 1.0
            dseg[b, d_used:d_used + t] = seg
            dpos[b, d_used:d_used + t] = np.arange(t)
            e_used, d_used = e_used + n, d_used + t
    batch = {"encoder_input_ids": enc, "encoder_segment_ids": eseg, "encoder_positions": epos,
             "decoder_input_ids": din, "decoder_target_ids": tgt, "decoder_loss_weights": w,
             "decoder_segment_ids": dseg, "decoder_positions": dpos}
    if max_images:
        size = model.vision.image_size
        batch["pixel_values"] = rng.standard_normal((B, max_images, 3, size, size)).astype(np.float32)
        batch["image_mask"] = image_mask
    return batch


def make_batches(cfg, model: T5Gemma2Config, split: str, process_index: int = 0, process_count: int = 1):
    """The configured batch source (`cfg` is an ExperimentConfig) for `split`."""
    if cfg.train.data_source == "synthetic":
        return SyntheticBatches(cfg.data, model, split=split, process_index=process_index,
                                process_count=process_count, eval_batches=cfg.train.eval_steps)
    from t5gemma2_jax.data import make_pipeline

    return make_pipeline(cfg.data, split, process_index, process_count)

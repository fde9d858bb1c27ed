"""Prompts in, texts out: the one path from encoded prompts to completions that the generate and
evaluation scripts, in-training evaluation and the demo share.

Prompts are padded into fixed-size batches (the last one padded with copies of its first row), so
one compiled `generate` program serves every batch; each row is cut at eos or pad, decoded, and
cut at the first stop string.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from t5gemma2_jax.data.prompts import default_suppress_tokens, pad_prompts
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.generation.generate import generate


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(ends)] if ends else text


def completion_ids(row: np.ndarray, eos_id: int, pad_id: int) -> np.ndarray:
    """The tokens of one generated row before its first eos or pad."""
    ends = np.flatnonzero((row == eos_id) | (row == pad_id))
    return row[:ends[0]] if len(ends) else row


def generate_texts(model, tokenizer: Tokenizer, prompts: Sequence[np.ndarray], *, pixel_values=None,
                   image_mask=None, max_new_tokens: int = 64, method: str = "greedy", num_beams: int = 4,
                   stop: Sequence[str] = (), suppress_tokens: Sequence[int] | str | None = "default",
                   min_new_tokens: int = 0, repetition_penalty: float = 1.0, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, rng: int = 0,
                   batch_size: int = 16) -> list[str]:
    """One completion per encoded prompt (`data.prompts.encode_prompt` rows).

    `pixel_values [N, images, C, H, W]` with `image_mask [N, images]` (generate's per-row layout)
    go with the prompts row for row. `suppress_tokens="default"` is
    `default_suppress_tokens(tokenizer)`; None suppresses nothing. With sampling, batch b draws
    from `rng + b`, so the texts depend on `batch_size`."""
    n = len(prompts)
    if n == 0:
        raise ValueError("generate_texts: no prompts")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(suppress_tokens, str):
        if suppress_tokens != "default":
            raise ValueError(f"suppress_tokens must be 'default', None or token ids, got {suppress_tokens!r}")
        suppress_tokens = default_suppress_tokens(tokenizer)
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values, np.float32)
        if pixel_values.ndim != 5 or pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values must be [{n} prompts, images, C, H, W], got shape {pixel_values.shape}")
        image_mask = (np.ones(pixel_values.shape[:2], bool) if image_mask is None
                      else np.asarray(image_mask, bool))
        if image_mask.shape != pixel_values.shape[:2]:
            raise ValueError(f"image_mask has shape {image_mask.shape}, expected {pixel_values.shape[:2]}")
    cfg = model.config
    size = min(batch_size, n)
    ids, mask = pad_prompts(prompts, cfg.pad_token_id)   # one length for all batches: one program
    texts: list[str] = []
    for b, lo in enumerate(range(0, n, size)):
        rows = np.arange(lo, lo + size)
        rows[rows >= n] = lo                            # filler rows repeat a real one, then are dropped
        tokens = generate(
            model, ids[rows], mask[rows],
            None if pixel_values is None else pixel_values[rows],
            image_mask=None if image_mask is None else image_mask[rows],
            max_new_tokens=max_new_tokens, method=method, num_beams=num_beams, temperature=temperature,
            top_k=top_k, top_p=top_p, rng=rng + b, suppress_tokens=suppress_tokens,
            min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
        for row in np.asarray(tokens)[: min(size, n - lo)]:
            text = tokenizer.decode(completion_ids(row, cfg.eos_token_id, cfg.pad_token_id))
            texts.append(cut_at_stop(text, stop))
    return texts

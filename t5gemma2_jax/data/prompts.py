"""Encoder inputs for inference, laid out the way training laid out its data.

`encode_prompt` is what `scripts/generate.py`, the demo and evaluation feed the encoder: bos, the
UL2 mode token of a pretrained model (`[S2S]` for continuation), each image as its token block at
its `<start_of_image>` marker (images without markers come first, as in the pretraining records),
and for a chat model the prompt inside Gemma's user turn followed by the model turn's opening,
exactly as the SFT pipeline renders conversations (`sft.ChatTemplate`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data.sft import ChatTemplate
from t5gemma2_jax.data.tokenizer import IMAGE_MARKER, Tokenizer


def encode_prompt(tok: Tokenizer, text: str, *, images: int = 0, mm_tokens_per_image: int = 0,
                  chat: bool = False, mode: str | None = None) -> np.ndarray:
    """Token ids `[L]` of one prompt; raises ConfigError naming a mode the tokenizer lacks or
    markers that do not match the images."""
    s = tok.special
    if mode is not None and mode not in s.modes:
        raise ConfigError(f"mode: {mode!r} is not a mode token of this tokenizer ({sorted(s.modes)})")
    parts = text.split(IMAGE_MARKER)
    if len(parts) - 1 not in (0, images):
        raise ConfigError(f"prompt: {len(parts) - 1} {IMAGE_MARKER} markers but {images} images")
    if len(parts) == 1 and images:
        parts = [""] * images + parts
    pieces = [tok.encode(parts[0])]
    for part in parts[1:]:
        pieces += [tok.image_block(mm_tokens_per_image), tok.encode(part)]
    body = np.concatenate(pieces).astype(np.int32)
    if chat:
        template = ChatTemplate(tok)
        body = np.concatenate([template.render_turn("user", body), template.generation_prompt])
    head = [s.bos] + ([s.modes[mode]] if mode else [])
    return np.concatenate([head, body]).astype(np.int32)


def pad_prompts(rows: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids `[B, L]` and the 0/1 attention mask of several prompts."""
    if not rows:
        raise ValueError("pad_prompts: no prompts")
    ids = np.full((len(rows), max(len(r) for r in rows)), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def default_suppress_tokens(tok: Tokenizer) -> list[int]:
    """Ids a completion must never contain: UL2 sentinels and mode tokens, the image
    placeholder and its start/end markers, pad and bos (training targets never hold them)."""
    s = tok.special
    return sorted({*s.sentinels, *s.modes.values(), s.boi, s.eoi, s.image, s.pad, s.bos})

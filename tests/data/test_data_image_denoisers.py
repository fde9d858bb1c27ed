"""data.image_denoisers="prefix": documents with images go through the prefix LM only (text still
gets every denoiser), in training's per-task streams and in the evaluation draw; records stay
counted."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_test_helpers import png_b64, tok  # noqa: F401  (tok is a fixture)
from t5gemma2_jax.data import DataConfig, make_pipeline
from t5gemma2_jax.data.config import DataConfigError


def _records(n: int = 40) -> list[dict]:
    return [{"text": f"a red circle {i} is above the blue square and the green triangle.",
             **({"images": [png_b64((i, 0, 0))]} if i % 2 else {})} for i in range(n)]


def _modes(batches, tok) -> dict[bool, set[str]]:
    """{has an image: the mode tokens of those segments} over `batches`."""
    modes = {v: k for k, v in tok.special.modes.items()}
    seen: dict[bool, set[str]] = {True: set(), False: set()}
    for batch in batches:
        for enc, seg in zip(batch["encoder_input_ids"], batch["encoder_segment_ids"]):
            for k in range(1, seg.max() + 1):
                ids = enc[seg == k]
                seen[bool((ids == tok.special.image).any())].add(modes[int(ids[1])])
    return seen


@pytest.mark.parametrize("split", ["train", "eval"])
def test_images_go_through_the_prefix_lm_only(tok, split):
    cfg = DataConfig(encoder_length=64, decoder_length=48, batch_size=4, max_images_per_row=1, image_size=8,
                     mm_tokens_per_image=4, ul2_denoisers="R:3:0.15:0.4,X:3:0.5:0.4,S:0.2", packing_bins=2)
    records = _records()
    prefix = make_pipeline(cfg.with_overrides({"image_denoisers": "prefix"}), split, records=records)
    every = make_pipeline(cfg, split, records=records)
    # training's streams never end: 12 batches of them; the evaluation split: one pass
    def take(pipe):
        return itertools.islice(pipe, 12) if split == "train" else pipe
    got, base = _modes(take(prefix), tok), _modes(take(every), tok)
    assert got[True] == {"[S2S]"} and {"[NLU]", "[NLG]"} <= got[False]
    assert {"[NLU]", "[NLG]"} & base[True]          # the default: images under every denoiser
    if split == "eval":                              # every record once, none counted as skipped
        stats = prefix.stats()
        assert stats["records_seen"] == len(records) and stats["examples"] == len(records)
        assert not any(v for k, v in stats.items() if k.startswith("skipped/"))


def test_prefix_only_needs_a_prefix_denoiser():
    with pytest.raises(DataConfigError, match="data.image_denoisers: 'prefix' needs a prefix-LM denoiser"):
        DataConfig(image_denoisers="prefix", ul2_denoisers="R:3:0.15:1")
    with pytest.raises(DataConfigError, match="data.image_denoisers: must be one of"):
        DataConfig(image_denoisers="span")
    assert np.isclose(sum(d.weight for d in DataConfig(image_denoisers="prefix").ul2_denoisers), 1.0)

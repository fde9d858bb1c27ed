"""Generation metrics on held-out examples: the model's completions against the references
(exact match, ROUGE-L, BLEU, chrF by default; any of `metrics.METRICS`, the multimodal ones against
every accepted answer of an example), with every prediction kept for a per-example file."""

from __future__ import annotations

from typing import Callable, Sequence

from t5gemma2_jax.data.elements import Example
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.evaluation.examples import example_pixels, prompt_ids, reference_text
from t5gemma2_jax.evaluation.metrics import TEXT_METRICS, score
from t5gemma2_jax.generation import generate_texts


def generation_eval(model, tok: Tokenizer, examples: Sequence[Example], *, max_images: int = 0,
                    image_size: int = 0, batch_size: int = 16, progress: Callable[[int], None] | None = None,
                    metrics: Sequence[str] = TEXT_METRICS, answers: Sequence[Sequence[str] | None] | None = None,
                    **generate_kw) -> tuple[dict, list[dict]]:
    """(metrics, one row per example: prompt, reference, prediction) of `examples`' completions
    (greedy by default; `generate_kw` go to `generate_texts`: method, num_beams, max_new_tokens, stop, ...).
    `answers`: per example its accepted answers (None: the reference alone), also in its row."""
    if not examples:
        raise ValueError("no examples to generate for")
    images = example_pixels(list(examples), max_images, image_size)
    # One call: every batch padded to one shape, so one compiled program serves them all.
    predictions = generate_texts(model, tok, [prompt_ids(ex, tok.special.bos) for ex in examples],
                                 pixel_values=None if images is None else images[0],
                                 image_mask=None if images is None else images[1], batch_size=batch_size,
                                 **generate_kw)
    if progress:
        progress(len(examples))
    references = [reference_text(ex, tok) for ex in examples]
    accepted = [list(a) if a else [r] for a, r in zip(answers or [None] * len(examples), references)]
    image = tok.special.image
    rows = [{"prompt": tok.decode([int(t) for t in prompt_ids(ex, tok.special.bos) if t != image]), "reference": r,
             "prediction": p, **({"answers": a} if answers else {})}
            for ex, r, p, a in zip(examples, references, predictions, accepted)]
    return {**score(metrics, predictions, accepted), "examples": len(examples)}, rows

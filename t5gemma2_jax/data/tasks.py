"""Task stage (a Grain flat map): a parsed record -> the examples of one task.

Pretraining: one `PretrainExamples` per UL2 denoiser in training (mixing happens later, on
packed rows); in evaluation one stream where each document draws its denoiser by weight from a
seed that depends only on the document's index, so every eval example appears exactly once and
the eval set is identical across runs. Text-only documents longer than a denoiser's limit are
split into equal chunks that fit (`documents_split`; data.long_documents="skip" drops them
instead); documents with images must fit whole.

Randomness (noise masks, split points) is seeded by (data.seed, task, record index, chunk), so
it does not depend on worker count or on where a run was resumed.

As in the parse stage, an exception while building one record's examples makes that record a
`skipped/parse_error` (none of its examples are kept) instead of ending the run.
"""

from __future__ import annotations

import numpy as np
from grain.experimental import FlatMapTransform

from t5gemma2_jax.data import counters
from t5gemma2_jax.data.counters import Skip, error_skip, make_skip
from t5gemma2_jax.data.elements import Conversation, Document, Example
from t5gemma2_jax.data.sft import ChatTemplate, sft_examples
from t5gemma2_jax.data.ul2 import Denoiser


def example_rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) & 0xFFFFFFFF for e in entropy]))


def _isolated(build, element: Document | Conversation) -> list[Example | Skip]:
    """`build(element)`, or one skip carrying the record's counts if it raises (so the record
    still counts in `records_seen`)."""
    try:
        return build(element)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - as in the parse stage
        return [error_skip(element.origin, e, records=0, counts=element.counts)]


class PretrainExamples(FlatMapTransform):
    """Document -> [Example | Skip] with one denoiser (`task_index`) or a per-document draw
    among all of them (`task_index=None`). With `images_prefix_only` a document with images is
    used by the prefix-LM denoisers only (data.image_denoisers="prefix"): a span-corruption task
    passes it on as a count-only `Skip`, the evaluation draw picks among the prefix denoisers."""

    def __init__(self, denoisers: list[Denoiser], weights: list[float], *, seed: int,
                 task_index: int | None, long_documents: str = "split", images_prefix_only: bool = False):
        self.denoisers = denoisers
        p = np.asarray(weights, np.float64)
        self.probs = p / p.sum()
        prefix = p * np.array([d.spec.kind == "prefix" for d in denoisers])
        self.image_probs = prefix / prefix.sum() if images_prefix_only and prefix.sum() > 0 else self.probs
        self.seed = seed
        self.task_index = task_index
        self.long_documents = long_documents
        self.images_prefix_only = images_prefix_only

    def flat_map(self, element: Document | Skip) -> list[Example | Skip]:
        if isinstance(element, Skip):
            return [element]
        return _isolated(self._examples, element)

    def _examples(self, doc: Document) -> list[Example | Skip]:
        L, k = len(doc.text_ids), len(doc.images)
        probs = self.image_probs if k else self.probs
        if self.task_index is None:
            t = int(example_rng(self.seed, 0x5EED, doc.index).choice(len(probs), p=probs))
        else:
            t = self.task_index
        den = self.denoisers[t]
        if k and self.images_prefix_only and den.spec.kind != "prefix":
            return [Skip(doc.counts, doc.origin)]         # the record is counted, not skipped
        extra = counters.zeros()
        if L < den.min_text_len(k):
            return [make_skip("too_short", doc.origin, f"{L} text tokens are too few for "
                              f"{den.spec.name}", records=0, counts=doc.counts)]
        if den.fits(L, k):
            chunks = [(doc.text_ids, doc.image_anchors, doc.images)]
        elif k or self.long_documents == "skip" or den.max_text_len(0) < 2:
            return [make_skip("too_long", doc.origin, f"{L} text tokens and {k} images do not "
                              f"fit {den.spec.name}", records=0, counts=doc.counts)]
        else:  # a long text-only document: equal chunks that each fit
            n = -(-L // den.max_text_len(0))
            empty = doc.image_anchors[:0]
            chunks = [(c, empty, doc.images) for c in np.array_split(doc.text_ids, n)]
            extra = counters.delta(documents_split=1)
        out: list[Example | Skip] = []
        for c, (ids, anchors, images) in enumerate(chunks):
            rng = example_rng(self.seed, t + 1, doc.index, c)
            out.append(den(ids, anchors, images, rng, counts=counters.zeros(), task=den.spec.name))
        out[0].counts = out[0].counts + doc.counts + extra
        return out


class SftExamples(FlatMapTransform):
    """Conversation -> [Example | Skip] (see `sft.py` for the template and truncation)."""

    def __init__(self, template: ChatTemplate, *, encoder_length: int, decoder_length: int,
                 max_images: int, turns: str, truncation: str, image_size: int):
        self.template = template
        self.kw = dict(encoder_length=encoder_length, decoder_length=decoder_length,
                       max_images=max_images, turns=turns, truncation=truncation,
                       image_shape=(3, image_size, image_size))

    def flat_map(self, element: Conversation | Skip) -> list[Example | Skip]:
        if isinstance(element, Skip):
            return [element]
        return _isolated(lambda conv: sft_examples(conv, self.template, **self.kw), element)

"""Text metrics over predictions and references, computed by the reference implementations:
ROUGE-L by Google's `rouge-score`, BLEU and chrF by `sacrebleu` (so figures compare with papers).

Scales are the libraries' own: `exact_match` and `rouge_l` (F-measure) in [0, 1], `bleu` and
`chrf` in [0, 100]. `METRICS` names these and the multimodal benchmarks' metrics
(`multimodal_metrics`: ANLS, VQA accuracy, relaxed accuracy, CIDEr), which take every accepted
answer of an example; `score` computes any of them by name.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Callable, Sequence

from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.evaluation import multimodal_metrics


def normalize(text: str) -> str:
    """Case and whitespace folded: the form exact match compares."""
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _check(predictions, references)
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence), rouge-score's tokenizer and no stemming."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenizer, exponential smoothing)."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {"exact_match": exact_match(predictions, references), "rouge_l": rouge_l(predictions, references),
            "bleu": bleu(predictions, references), "chrf": chrf(predictions, references)}


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


# name -> metric; the first four score against one reference per example, the rest against all.
METRICS: dict[str, Callable[[Sequence[str], Sequence], float]] = {
    "exact_match": exact_match, "rouge_l": rouge_l, "bleu": bleu, "chrf": chrf,
    "anls": multimodal_metrics.anls, "vqa_accuracy": multimodal_metrics.vqa_accuracy,
    "relaxed_accuracy": multimodal_metrics.relaxed_accuracy, "cider": multimodal_metrics.cider,
}
TEXT_METRICS = ("exact_match", "rouge_l", "bleu", "chrf")
# The packages of the metrics that come with the `multimodal-metrics` extra.
EXTRA_PACKAGES = {"anls": ("anls",), "cider": ("pycocoevalcap", "nltk")}


def check_available(names: Sequence[str]) -> None:
    """ConfigError naming the extra to install when a metric's package is missing (checked before
    a model is loaded, not after its generations)."""
    missing = sorted({p for n in names for p in EXTRA_PACKAGES.get(n, ()) if importlib.util.find_spec(p) is None})
    if missing:
        raise ConfigError(f"--metrics: {', '.join(missing)} not installed (pip install 't5gemma2-jax[multimodal-metrics]')")


def score(names: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{name: value} of the metrics `names` (keys of `METRICS`); `references` holds each example's
    accepted answers, the first of them the one reference of the text metrics."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    multimodal_metrics.check_references(predictions, references)
    first = [refs[0] for refs in references]
    return {n: METRICS[n](predictions, first if n in TEXT_METRICS else references) for n in names}

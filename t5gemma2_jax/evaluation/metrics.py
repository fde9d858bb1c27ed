"""Text metrics over predictions and references, computed by the reference implementations:
ROUGE-L by Google's `rouge-score`, BLEU and chrF by `sacrebleu` (so figures compare with papers).

Scales are the libraries' own: `exact_match` and `rouge_l` (F-measure) in [0, 1], `bleu` and
`chrf` in [0, 100].
"""

from __future__ import annotations

import re
from typing import Sequence


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

"""The metrics of the multimodal benchmarks the T5Gemma 2 paper reports, each over predictions and,
per example, every accepted reference answer:

  anls              DocVQA, InfographicVQA: average normalised Levenshtein similarity (threshold 0.5)
  vqa_accuracy      VQAv2, TextVQA: min(#annotators who gave the answer / 3, 1), averaged over the
                    leave-one-annotator-out subsets, after the VQA answer normalisation
  relaxed_accuracy  ChartQA: numbers within 5% of the answer, other answers exactly (case folded)
  cider             captions: CIDEr-D of the COCO caption evaluation

All four are in [0, 1] except CIDEr (COCO's scale: 10 x the mean n-gram cosine, so up to 10).
"""

from __future__ import annotations

import re
from typing import Sequence

References = Sequence[Sequence[str]]


def check_references(predictions: Sequence[str], references: References) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"example {i}: references must be a non-empty list of strings, got {refs!r}")


# -- ANLS -----------------------------------------------------------------------------------------

def anls_scores(predictions: Sequence[str], references: References, threshold: float = 0.5) -> list[float]:
    """Per example: max over the answers of 1 - NL(answer, prediction), 0 where NL >= threshold
    (Biten et al. 2019, eq. 1), case- and outer-space-insensitive, computed by the `anls` package.
    At exactly NL = 0.5 this is 0, as in the paper's definition; the Robust Reading Competition's
    scoring script keeps 0.5 there (`1 - NL < 0.5` -> 0)."""
    from anls import anls_score

    check_references(predictions, references)
    return [float(anls_score(p, list(refs), threshold=threshold)) for p, refs in zip(predictions, references)]


def anls(predictions: Sequence[str], references: References) -> float:
    return _mean(anls_scores(predictions, references))


# -- VQA accuracy ---------------------------------------------------------------------------------
# Hand-written: the official evaluation (GT-Vision-Lab/VQA's vqaEval.py, and the EvalAI answer
# processor that TextVQA's evaluation and MMF/lmms-eval copy) is not published as a package. What
# follows is that processor: the same punctuation list, number words, articles and contractions.

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")   # a period not followed by a digit (the original's regex)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official table maps each spelling that lacks one apostrophe of a contraction to the
# contraction ("couldnt've" and "couldn'tve" -> "couldn't've"); it is generated here from the
# contractions themselves. Its entries that can never apply or change no match are left out: the
# capitalised "Im"/"Ive"/"Id've" (answers are lower-cased before the lookup), the identities
# "let's"/"she's", and "somebody'd" -> "somebodyd" (the reverse direction, the same equivalence).
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()


def _contractions() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        cuts = [i for i, c in enumerate(word) if c == "'"]
        for i in cuts:
            table[word[:i] + word[i + 1:]] = word
    return table


_CONTRACTIONS = _contractions()


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: lower case, commas and question marks dropped,
    other punctuation removed (or a space where it joins two words), periods dropped unless in a
    number, number words as digits, articles dropped, missing apostrophes of contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy_scores(predictions: Sequence[str], references: References) -> list[float]:
    """Per example: the mean over annotators i of min(1, #(other annotators whose normalised answer
    equals the normalised prediction) / 3) (Antol et al. 2015; with 10 answers, the 10-choose-9
    subsets). References are the annotators' answers, repeats included."""
    check_references(predictions, references)
    scores = []
    for pred, refs in zip(predictions, references):
        p = normalize_vqa_answer(pred)
        answers = [normalize_vqa_answer(r) for r in refs]
        matches = sum(a == p for a in answers)
        # Leaving out annotator i removes one match exactly when i gave the predicted answer.
        scores.append(sum(min(1.0, (matches - (a == p)) / 3) for a in answers) / len(answers))
    return scores


def vqa_accuracy(predictions: Sequence[str], references: References) -> float:
    return _mean(vqa_accuracy_scores(predictions, references))


# -- relaxed accuracy -----------------------------------------------------------------------------
# Hand-written: the reference implementation (pix2struct's `relaxed_correctness`, which ChartQA
# results are computed with) is research code, not a package. This is its rule.

def _number(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """A number within `max_relative_change` of a non-zero numeric target (a trailing % divides by
    100), else the two strings equal ignoring case (Masry et al. 2022, section 5.1)."""
    prediction, target = prediction.strip(), target.strip()
    p, t = _number(prediction), _number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy_scores(predictions: Sequence[str], references: References) -> list[float]:
    check_references(predictions, references)
    return [float(any(relaxed_correct(p, r) for r in refs)) for p, refs in zip(predictions, references)]


def relaxed_accuracy(predictions: Sequence[str], references: References) -> float:
    return _mean(relaxed_accuracy_scores(predictions, references))


# -- CIDEr ----------------------------------------------------------------------------------------

def caption_tokens(text: str) -> str:
    """A caption as the COCO evaluation scores it: Penn Treebank tokens, lower-cased, without the
    punctuation tokens it removes. COCO runs Stanford's Java PTBTokenizer (a Java runtime, and a
    temporary file written into the installed package); NLTK's Treebank tokenizer applies the same
    Penn Treebank rules in Python and agrees with it on ordinary captions."""
    from nltk.tokenize import TreebankWordTokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    tokens = TreebankWordTokenizer().tokenize(text.replace("\n", " ").lower(), convert_parentheses=True)
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def cider_scores(predictions: Sequence[str], references: References) -> list[float]:
    """Per example CIDEr-D (Vedantam et al. 2015) by `pycocoevalcap`'s scorer; the n-gram weights
    (idf) come from the references of all examples together, so a score depends on the whole set."""
    from pycocoevalcap.cider.cider import Cider

    check_references(predictions, references)
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    _, scores = Cider().compute_score(gts, res)
    return [float(s) for s in scores]


def cider(predictions: Sequence[str], references: References) -> float:
    return _mean(cider_scores(predictions, references))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)

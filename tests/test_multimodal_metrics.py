"""The multimodal benchmarks' metrics against values worked out by hand from their published
definitions (normalisation edge cases included), and scripts/evaluate.py scoring image+question
records with them end to end on a tiny vision model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from t5gemma2_jax.evaluation import metrics
from t5gemma2_jax.evaluation import multimodal_metrics as mm
from scripts_loader import load_script


# -- ANLS (Biten et al. 2019, eq. 1; threshold 0.5) -----------------------------------------------

def test_anls_is_one_minus_the_normalised_edit_distance_of_the_closest_answer():
    # "hello wrld" vs "hello world": 1 edit over max(10, 11) characters; case and outer spaces ignored
    assert mm.anls(["  Hello Wrld "], [["hello world"]]) == pytest.approx(1 - 1 / 11)
    # the best of several answers counts: "2 pm" is 0 edits from the second
    assert mm.anls(["2 pm"], [["two pm", "2 pm"]]) == 1.0
    # NL >= 0.5 scores 0: "ab" vs "ac" is exactly 0.5, "abc" vs "xyz" is 1
    assert mm.anls(["ab", "abc"], [["ac"], ["xyz"]]) == 0.0
    # NL just below 0.5 keeps its similarity: "abcd" vs "abxy" (2 / 4 = 0.5 -> 0), "abcde" vs "abxye" (2 / 5)
    assert mm.anls_scores(["abcd", "abcde"], [["abxy"], ["abxye"]]) == [0.0, pytest.approx(0.6)]
    # the mean over questions
    assert mm.anls(["a", "b"], [["a"], ["c"]]) == 0.5


# -- VQA accuracy (Antol et al. 2015; the official evaluation's normalisation) ---------------------

def test_vqa_accuracy_averages_min_matches_over_three_over_the_leave_one_out_subsets():
    # 3 of 10 said "yes": leaving out a "yes" leaves 2 matches (2/3), a "no" leaves 3 (1)
    three = ["yes"] * 3 + ["no"] * 7
    assert mm.vqa_accuracy(["yes"], [three]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    # 2 of 10: (2 x 1/3 + 8 x 2/3) / 10 = 0.6; 1 of 10: 9 x 1/3 / 10 = 0.3; 0: 0
    two = ["2"] * 2 + ["3"] * 8
    assert mm.vqa_accuracy(["2", "3"], [two, ["3"] + ["4"] * 9]) == pytest.approx((0.6 + 0.3) / 2)
    assert mm.vqa_accuracy(["5"], [two]) == 0.0
    # 4 or more matches: 1 whichever annotator is left out
    assert mm.vqa_accuracy(["no"], [three]) == 1.0


def test_vqa_normalisation_edge_cases():
    n = mm.normalize_vqa_answer
    assert n("Two dogs.") == "2 dogs"                      # number words, case, trailing period
    assert n("the dog") == n("a dog") == "dog"              # articles
    assert n("dont") == n("don't") == "don't"               # contractions, one apostrophe missing
    assert n("couldnt've") == n("couldn'tve") == "couldn't've"
    assert n("stop-sign") == "stop sign"                    # a hyphen between words: a space
    assert n("stop - sign") == "stop sign"                  # next to a space: removed
    assert n("1,000") == "1000"                             # thousands separators
    assert n("3.5 m") == "3.5 m"                            # a decimal point stays
    assert n("yes!") == "yes" and n("what?") == "what"
    assert n("none") == "0"
    # predictions and answers are compared after the same normalisation
    assert mm.vqa_accuracy(["Two."], [["2"] * 10]) == 1.0
    assert mm.vqa_accuracy(["the red one"], [["red 1"] * 4]) == 1.0


# -- relaxed accuracy (Masry et al. 2022, section 5.1) ---------------------------------------------

def test_relaxed_accuracy_tolerates_five_percent_on_numbers_only():
    assert mm.relaxed_correct("12", "12.5")                 # |12 - 12.5| / 12.5 = 0.04
    assert mm.relaxed_correct("13.125", "12.5")             # exactly 0.05
    assert not mm.relaxed_correct("13.2", "12.5")           # 0.056
    assert mm.relaxed_correct("45%", "0.45")                # a percent sign divides by 100
    assert mm.relaxed_correct("Yes", "yes") and not mm.relaxed_correct("yes.", "yes")   # text: exact, case folded
    assert not mm.relaxed_correct("0.0", "0")               # a zero target compares as text
    assert not mm.relaxed_correct("12 apples", "12")        # not a number: exact match
    assert mm.relaxed_accuracy(["12", "blue", "7"], [["12.5"], ["Blue"], ["9", "7.2"]]) == 1.0
    assert mm.relaxed_accuracy(["11", "red"], [["12.5"], ["blue"]]) == 0.0


# -- CIDEr-D (Vedantam et al. 2015, as the COCO evaluation computes it) ------------------------------

def test_cider_of_hand_worked_corpora():
    # Two images, one reference each. Every n-gram of the references is in one image's references
    # (df = 1) of N = 2: idf = log 2 - log max(1, df), also for n-grams no reference has (df 0).
    # Identical 2-word captions: unigram and bigram cosines 1, no 3/4-grams (0): 10 x mean(1, 1, 0, 0) = 5.
    assert mm.cider(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # "a x" against "a b": unigram cosine 1/2, bigram 0 -> 10 x 0.5 / 4 = 1.25 (the other image 5)
    assert mm.cider_scores(["a x", "c d"], [["a b"], ["c d"]]) == [pytest.approx(1.25), pytest.approx(5.0)]
    # "a b c" against "a b": unigram 2/sqrt(6), bigram 1/sqrt(2), trigram 0 (no reference trigram),
    # times the length penalty exp(-delta^2 / (2 sigma^2)), sigma 6, delta = 2 - 1 (COCO's lengths
    # count bigrams)
    want = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    assert mm.cider_scores(["a b c", "c d"], [["a b"], ["c d"]])[0] == pytest.approx(want)
    # tokenised as COCO does: lower case, punctuation tokens dropped
    assert mm.caption_tokens("A Dog, (running) on grass.") == "a dog running on grass"
    assert mm.cider(["A B.", "c, d!"], [["a b"], ["C D"]]) == pytest.approx(5.0)


def test_metrics_by_name_and_their_errors():
    got = metrics.score(["exact_match", "vqa_accuracy", "anls"], ["yes", "no"], [["yes", "yes", "yes"], ["No"]])
    # three annotators said "yes": 2 matches whichever is left out (2/3); one said "no": 0 left
    assert got == {"exact_match": 1.0, "vqa_accuracy": pytest.approx((2 / 3 + 0.0) / 2), "anls": 1.0}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score(["bleurt"], ["a"], [["a"]])
    with pytest.raises(ValueError, match="example 0: references must be a non-empty list"):
        mm.anls(["a"], [[]])
    with pytest.raises(ValueError, match="2 predictions for 1 reference lists"):
        mm.vqa_accuracy(["a", "b"], [["a"]])


# -- end to end: scripts/evaluate.py over image+question records -----------------------------------

@pytest.fixture(scope="module")
def vision_export(tmp_path_factory):
    """A random tiny vision model (2+2 layers) as a params export: the tiny tokenizer is its own."""
    from flax import nnx

    import t5gemma2_jax as tg
    from t5gemma2_jax.checkpoints.export import flat_params, save_export

    layers = {"num_layers": 2, "layer_types": ("sliding_attention", "full_attention")}
    cfg = tg.preset("tiny")
    cfg = cfg.replace(with_vision=True, encoder=cfg.encoder.replace(**layers), decoder=cfg.decoder.replace(**layers))
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    return save_export(tmp_path_factory.mktemp("vision") / "export", cfg, flat_params(model))


def _write_records(root, answers_of):
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i, answers in enumerate(answers_of):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / f"img{i}.png")
        lines.append({"messages": [{"role": "user", "content": f"what is written on sign {i}?", "images": [f"img{i}.png"]},
                                   {"role": "model", "content": answers[0]}],
                      **({"answers": answers} if answers else {})})
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root / "vqa.jsonl"


@pytest.mark.slow
def test_evaluate_scores_image_question_records_with_the_benchmark_metrics(vision_export, tmp_path):
    answers_of = [["stop"] * 6 + ["stop sign"] * 4, ["exit", "Exit."], ["12"], ["open"]]
    data = _write_records(tmp_path, answers_of)
    out, preds = tmp_path / "results.json", tmp_path / "predictions.jsonl"
    names = ["anls", "vqa_accuracy", "relaxed_accuracy", "cider", "exact_match"]
    common = ["--checkpoint", str(vision_export), "--data", str(data), "--generate", "--max-new-tokens", "3",
              "--encoder-length", "64", "--decoder-length", "8", "--max-batches", "1", "--no-progress"]
    evaluate = load_script("evaluate")
    evaluate.run(common + ["--metrics", ",".join(names), "--out", str(out), "--predictions", str(preds)])
    results = json.loads(out.read_text())
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert results["kind"] == "sft" and results["examples"] == 4 and len(rows) == 4
    assert [r["answers"] for r in rows] == answers_of
    predictions = [r["prediction"] for r in rows]
    for name in names:           # each figure is the metric of the predictions against all the answers
        refs = [a[0] for a in answers_of] if name == "exact_match" else answers_of
        assert results[name] == pytest.approx(metrics.METRICS[name](predictions, refs)), name
    assert results["config"]["options"]["metrics"] == names

    # The same model answers the same first question alike: with its answer as every annotator's,
    # each metric is 1; a record whose answers are not a list is left out and counted.
    lines = data.read_text().splitlines()
    first, bad = json.loads(lines[0]), json.loads(lines[1])
    first["answers"], bad["answers"] = [predictions[0]] * 4, "exit"
    data.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
    again = evaluate.run(common + ["--metrics", "anls,vqa_accuracy,relaxed_accuracy,exact_match"])
    assert again["examples"] == 1 and again["generation_skipped"] == {"bad_answers": 1}
    assert [again[m] for m in ("anls", "vqa_accuracy", "relaxed_accuracy", "exact_match")] == [1.0] * 4


def test_evaluate_refuses_unknown_metrics(tmp_path, capsys):
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}]}) + "\n")
    assert load_script("evaluate").main(["--checkpoint", str(tmp_path), "--data", str(data), "--generate",
                                         "--metrics", "anls,bleurt", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --metrics: unknown ['bleurt']") and err.count("\n") == 1, err


def test_a_missing_metric_package_names_the_extra(monkeypatch):
    import importlib.util

    from t5gemma2_jax.configlib import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocoevalcap" else real(name, *a))
    metrics.check_available(["anls", "vqa_accuracy"])
    with pytest.raises(ConfigError, match=r"--metrics: pycocoevalcap not installed \(pip install 't5gemma2-jax\[multimodal-metrics\]'\)"):
        metrics.check_available(["cider"])

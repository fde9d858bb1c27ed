"""scripts/compare.py: results files as evaluate.py writes them -> one markdown table (variants side
by side, best in bold) and one plot; bad input is one line, exit status 2."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from scripts_loader import load_script


def _results(path, checkpoint, data, **metrics):
    """A results file in evaluate.py's layout (the keys `evaluation/run.evaluate` writes)."""
    obj = {"checkpoint": checkpoint, "source": "run", "step": 400, "data": data, "kind": "sft", "tokens": 512.0,
           "batches": 2, "records_seen": 40, "skipped": {}, "examples": 40, "config": {"options": {}}, **metrics}
    path.write_text(json.dumps(obj, indent=1))
    return str(path)


def test_two_variants_on_two_benchmarks_side_by_side(tmp_path):
    files = [_results(tmp_path / "a1.json", "/runs/merged", "/data/textvqa.jsonl", loss=1.5, perplexity=4.48,
                      vqa_accuracy=0.40, per_task={"S": {"loss": 1.2, "perplexity": 3.3, "tokens": 9.0}}),
             _results(tmp_path / "a2.json", "/runs/merged", "/data/docvqa.jsonl", anls=0.61),
             _results(tmp_path / "b1.json", "/runs/separate/checkpoints/400", "/data/textvqa.jsonl", loss=1.4,
                      perplexity=4.06, vqa_accuracy=0.35, per_task={"S": {"loss": 1.3, "perplexity": 3.7, "tokens": 9.0}}),
             _results(tmp_path / "b2.json", "/runs/separate/checkpoints/400", "/data/docvqa.jsonl", anls=0.61)]
    out, plot = tmp_path / "compare.md", tmp_path / "compare.png"
    table = load_script("compare").run(files + ["--out", str(out), "--plot", str(plot)])
    assert out.read_text() == table
    assert table.splitlines() == [
        "| metric | merged | separate@400 |",
        "|---|---:|---:|",
        "| textvqa: loss | 1.5 | **1.4** |",                # lower is better
        "| textvqa: perplexity | 4.48 | **4.06** |",
        "| textvqa: vqa_accuracy | **0.4** | 0.35 |",        # higher is better
        "| textvqa: loss (S) | **1.2** | 1.3 |",
        "| textvqa: perplexity (S) | **3.3** | 3.7 |",
        "| docvqa: anls | **0.61** | **0.61** |",             # a tie: both
    ]
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 300

    named = load_script("compare").run(files + ["--names", "A,B", "--metrics", "anls,vqa_accuracy"])
    assert named.splitlines()[0] == "| metric | A | B |"
    assert [line.split(" |")[0] for line in named.splitlines()[2:]] == ["| docvqa: anls", "| textvqa: vqa_accuracy"]


def test_one_benchmark_rows_are_bare_metric_names_and_missing_values_are_dashes(tmp_path):
    files = [_results(tmp_path / "a.json", "/runs/a/export", "/d/heldout.jsonl", exact_match=0.5, bleu=12.0),
             _results(tmp_path / "b.json", "/runs/b/export", "/d/heldout.jsonl", exact_match=0.25)]
    table = load_script("compare").run(files)
    assert table.splitlines()[0] == "| metric | a/export | b/export |"
    assert table.splitlines()[2:] == ["| exact_match | **0.5** | 0.25 |", "| bleu | 12 | - |"]


@pytest.mark.parametrize("case, words", [
    ("missing", "no such results file"),
    ("not_json", "not a results JSON file"),
    ("not_results", "not a results file of scripts/evaluate.py"),
    ("names", "--names: 1 names for 2 checkpoints"),
    ("metrics", "--metrics: no results file has ['cider']"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, words):
    a = _results(tmp_path / "a.json", "/runs/a", "/d/x.jsonl", anls=0.5)
    b = _results(tmp_path / "b.json", "/runs/b", "/d/x.jsonl", anls=0.6)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    argv = {"missing": [a, str(tmp_path / "nope.json")], "not_json": [a, str(tmp_path / "bad.json")],
            "not_results": [str(tmp_path / "other.json")], "names": [a, b, "--names", "A"],
            "metrics": [a, b, "--metrics", "cider"]}[case]
    assert load_script("compare").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err

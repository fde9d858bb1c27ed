"""The long-context (RULER-style) tasks: records deterministic per seed, filled to within 1% of the
requested length in two tokenizers' tokens without passing it, each answer exactly where its record
says and nowhere else; RULER's string-match metrics; the table from a hand-made predictions file;
lm-eval task YAMLs over the files; scripts/ruler.py end to end on a tiny model at two lengths."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from scripts_loader import load_script
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data import Tokenizer, tiny_tokenizer_path, train_tokenizer
from t5gemma2_jax.data.prompts import encode_prompt
from t5gemma2_jax.evaluation import ruler, ruler_score

LENGTH = 1024


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer(tiny_tokenizer_path())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A second SentencePiece model, 4096 pieces trained on the word lists: it splits the same text
    into about half the tiny model's tokens."""
    words = ruler.word_lists()
    rng = np.random.default_rng(0)
    lines = [ruler.NOISE] + [" ".join(rng.choice(words[c], 12)) for c in words for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "trained.model"
    path.write_bytes(train_tokenizer(lines, vocab_size=4096))
    return Tokenizer(path)


@pytest.fixture(scope="module")
def records(tiny):
    """Every task at LENGTH in the tiny tokenizer's tokens: three records each, the needles at the
    start, the middle and the end."""
    return {task: ruler.make_records(task, tiny, LENGTH, 3, seed=0) for task in ruler.TASK_NAMES}


def _found(text: str, s: str) -> list[int]:
    """Offsets of `s` in `text` as a case-insensitive regular expression finds them (overlaps too)."""
    return [m.start() for m in re.finditer(f"(?={re.escape(s)})", text, re.IGNORECASE)]


def test_records_are_deterministic_per_seed(tiny):
    for task in ("niah_multikey", "cwe", "qa"):
        a = ruler.make_records(task, tiny, 600, 2, seed=3)
        assert ruler.make_records(task, tiny, 600, 2, seed=3) == a
        assert ruler.make_record(task, tiny, 600, 1, num_samples=2, seed=3) == a[1]     # alone as in a file
        other = ruler.make_records(task, tiny, 600, 2, seed=4)
        assert [r["input"] for r in other] != [r["input"] for r in a]
        assert a[0]["input"] != a[1]["input"]
    words = ruler.make_record("niah_single", tiny, 600, 0, seed=3, haystack="words")
    assert words == ruler.make_record("niah_single", tiny, 600, 0, seed=3, haystack="words")
    assert words["input"] != ruler.make_record("niah_single", tiny, 600, 0, seed=3)["input"]


@pytest.mark.parametrize("which", ["tiny", "trained"])
def test_every_task_fills_its_length_within_one_percent(which, request, records):
    tok = request.getfixturevalue(which)
    for task in ruler.TASK_NAMES:
        for rec in (records[task] if which == "tiny" else ruler.make_records(task, tok, LENGTH, 2, seed=1)):
            n = len(encode_prompt(tok, rec["input"]))
            assert rec["tokens"] == n and 0.99 * LENGTH <= n <= LENGTH, (task, n)
    # The fixed layout counts too: inside the chat template, after a UL2 mode token.
    chat = ruler.make_record("qa", tok, 700, 0, chat=True)
    assert chat["tokens"] == len(encode_prompt(tok, chat["input"], chat=True)) and 693 <= chat["tokens"] <= 700
    mode = ruler.make_record("vt", tok, 700, 0, mode="[S2S]")
    assert mode["tokens"] == len(encode_prompt(tok, mode["input"], mode="[S2S]")) and 693 <= mode["tokens"] <= 700


def test_answers_are_exactly_where_the_record_says_and_nowhere_else(records):
    for task, recs in records.items():
        for rec in recs:
            text = rec["input"]
            assert len(rec["positions"]) == len(rec["answers"]) >= 1
            for answer, positions in zip(rec["answers"], rec["positions"]):
                assert positions and _found(text, answer) == positions, (task, answer)
                assert all(text[p:p + len(answer)] == answer for p in positions)
            for n in rec["needles"]:
                assert text[n["char"]:n["char"] + len(n["text"])] == n["text"]
            assert rec["metric"] == ("string_match_part" if task == "qa" else "string_match_all")


def test_each_task_hides_what_it_asks_for(records):
    by_answer = lambda rec: {a: p for a, p in zip(rec["answers"], rec["positions"])}  # noqa: E731
    for rec in records["niah_single"]:
        (needle,) = rec["needles"]
        assert needle["text"].endswith(f"is: {rec['answers'][0]}.")
        assert abs(needle["depth"] - rec["depth"]) < 0.02                  # at the start, middle and end
    assert [r["depth"] for r in records["niah_single"]] == [0.0, 0.5, 1.0]
    for rec in records["niah_multikey"]:
        keys = {re.search(r"numbers for (\S+) is: (\d+)", n["text"]).group(2): re.search(
            r"numbers for (\S+) is", n["text"]).group(1) for n in rec["needles"]}
        assert len(set(keys.values())) == ruler.NEEDLES                     # the queried key and three others
        assert f"magic number for {keys[rec['answers'][0]]} in the text above?" in rec["input"]
    for rec in records["niah_multivalue"]:
        assert len(rec["answers"]) == len(rec["needles"]) == ruler.NEEDLES
        assert len({re.search(r"numbers for (\S+) is", n["text"]).group(1) for n in rec["needles"]}) == 1
    for rec in records["niah_multiquery"]:
        assert len(rec["answers"]) == ruler.NEEDLES and all(k in rec["input"].split("Question:")[1] for k in
                                                            [re.search(r"numbers for (\S+) is", n["text"]).group(1)
                                                             for n in rec["needles"]])
    for rec in records["vt"]:
        # The queried chain in text order: its value first, then each variable assigned the one before.
        value = re.search(r"assigned the value (\d+)", rec["input"]).group(1)
        chain = re.findall(r"VAR (\w+) = ", rec["input"])
        first = re.search(rf"VAR (\w+) = {value}\.", rec["input"]).group(1)
        names = [first]
        while (nxt := re.search(rf"VAR (\w+) = VAR {names[-1]}\.", rec["input"])):
            names.append(nxt.group(1))
        assert names == rec["answers"] and len(names) == ruler.VT_HOPS + 1
        assert len(chain) == ruler.VT_CHAINS * (ruler.VT_HOPS + 1)
        assert [len(by_answer(rec)[n]) for n in names] == [2] * ruler.VT_HOPS + [1]   # assigned, then read
    for rec in records["cwe"]:
        items = re.findall(r"(?:^|\s)\d+\. ([a-z]+)", rec["input"].split("\n\n")[1])
        counts = {w: items.count(w) for w in set(items)}
        frequent = sorted(counts, key=counts.get, reverse=True)[:ruler.CWE_WORDS]
        assert sorted(frequent) == sorted(rec["answers"]) and len(rec["answers"]) == ruler.CWE_WORDS
        assert min(counts[w] for w in rec["answers"]) > max(c for w, c in counts.items() if w not in rec["answers"])
    for rec in records["qa"]:
        (gold,) = rec["needles"]
        name = re.search(r"does (.+) live\?", rec["input"]).group(1)
        assert gold["text"].startswith(f"{name} lives in {rec['answers'][0]}.")
        towns = re.findall(r"lives in (\w+)\.", rec["input"])
        assert len(towns) == len(set(towns)) > 3                           # distractors, each its own town


def test_a_length_too_short_for_the_task_is_named(tiny, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--lengths: 128 tokens cannot hold niah_multikey: .* take \d+ tokens"):
        ruler.make_record("niah_multikey", tiny, 128, 0)
    script = load_script("ruler")
    assert script.main(["generate", "--tokenizer", tiny_tokenizer_path(), "--lengths", "128", "--tasks", "cwe",
                        "--samples", "1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --lengths: 128 tokens cannot hold cwe")
    assert script.main(["generate", "--tokenizer", tiny_tokenizer_path(), "--lengths", "1K", "--tasks", "niah",
                        "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --tasks: unknown ['niah']")


def test_generate_writes_training_conversations_beside_the_records(tiny, tmp_path, capsys):
    script = load_script("ruler")
    args = ["generate", "--tokenizer", tiny_tokenizer_path(), "--lengths", "512", "--tasks", "niah_single,vt",
            "--samples", "2", "--out", str(tmp_path)]
    assert script.main([*args, "--sft"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --sft: the conversations are laid out")
    assert script.main([*args, "--sft", "--chat"]) == 0
    for task in ("niah_single", "vt"):
        records = ruler.read_records(tmp_path / f"{task}_512.jsonl")
        turns = [json.loads(line) for line in (tmp_path / f"{task}_512.sft.jsonl").read_text().splitlines()]
        assert [t["messages"] for t in turns] == [
            [{"role": "user", "content": r["input"]}, {"role": "model", "content": ", ".join(r["answers"])}]
            for r in records]
        # The conversation's encoder input is the record's laid-out prompt, whose length it states.
        assert all(len(encode_prompt(tiny, r["input"], chat=True)) == r["tokens"] <= 512 for r in records)
    # Scoring a directory reads the generated records only, not the conversations beside them.
    assert sorted(p.name for p in script._files([str(tmp_path)])) == ["niah_single_512.jsonl", "vt_512.jsonl"]


def test_string_match_is_rulers_definition():
    answers = ["1234567", "7654321", "ABCDE"]
    assert ruler.string_match_all("the numbers are 1234567 and abcde", answers) == pytest.approx(2 / 3)
    assert ruler.string_match_part("the numbers are 1234567 and abcde", answers) == 1.0
    assert ruler.string_match_part("none", answers) == 0.0 and ruler.string_match_all("", answers) == 0.0
    assert ruler.string_match_all("  7654\x0021  ", ["7654\n21"]) == 1.0       # control characters become newlines
    rec = {"answers": ["Zincbury"], "metric": "string_match_part"}
    assert ruler.score("He lives in zincbury.", rec) == 1.0


def test_table_of_a_hand_made_predictions_file(tmp_path, capsys):
    def r(task, length, answers, prediction, metric="string_match_all"):
        return {"task": task, "length": length, "answers": answers, "metric": metric, "prediction": prediction}

    rows = [r("niah_single", 4096, ["111"], "it is 111"), r("niah_single", 4096, ["222"], "333"),
            r("niah_single", 8192, ["444"], "444."),
            r("vt", 4096, ["AAAAA", "BBBBB", "CCCCC", "DDDDD"], "aaaaa, BBBBB and ddddd"),
            r("qa", 8192, ["Zincbury", "Zinc"], "zinc", "string_match_part")]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    out, md = tmp_path / "table.json", tmp_path / "table.md"
    load_script("ruler").run(["score", "--predictions", str(path), "--out", str(out), "--markdown", str(md)])
    table = json.loads(out.read_text())
    assert table["lengths"] == [4096, 8192]
    assert table["tasks"] == {"niah_single": {"4096": 50.0, "8192": 100.0}, "vt": {"4096": 75.0},
                              "qa": {"8192": 100.0}}
    assert table["average"] == {"4096": 62.5, "8192": 100.0}
    assert table["samples"] == {"niah_single": {"4096": 2, "8192": 1}, "vt": {"4096": 1}, "qa": {"8192": 1}}
    want = ("| task | 4K | 8K |\n|---|---:|---:|\n| niah_single | 50.0 | 100.0 |\n| vt | 75.0 |  |\n"
            "| qa |  | 100.0 |\n| **average** | 62.5 | 100.0 |\n")
    assert md.read_text() == want and capsys.readouterr().out == want
    path.write_text(json.dumps({"task": "qa", "length": 8}) + "\n")
    assert load_script("ruler").main(["score", "--predictions", str(path)]) == 2
    assert "row 1 has no answers, metric, prediction" in capsys.readouterr().err


def _hook(yaml_path: Path):
    """The `!function` a task YAML names, loaded the way lm-eval loads it: the module file beside it."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    config = yaml.load(yaml_path.read_text(), Loader=Loader)
    module, name = config["process_results"][1].rsplit(".", 1)
    spec = importlib.util.spec_from_file_location(module, yaml_path.parent / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return config, getattr(mod, name)


def test_lm_eval_task_yamls_over_the_generated_files(tiny, tmp_path):
    import jinja2

    paths = ruler.write_tasks(tmp_path / "data", tiny, tasks=["niah_multivalue", "qa"], lengths=[600], num_samples=2)
    yamls = ruler.write_lm_eval_tasks(paths, tmp_path / "lm_eval")
    assert [y.name for y in yamls] == ["ruler_niah_multivalue_600.yaml", "ruler_qa_600.yaml"]
    for data, y in zip(paths, yamls):
        config, process_results = _hook(y)
        doc = ruler.read_records(data)[1]
        assert config["task"] == y.stem and config["tag"] == ["ruler", "ruler_600", f"ruler_{doc['task']}"]
        assert (config["dataset_path"], config["output_type"], config["test_split"]) == (
            "json", "generate_until", "test")
        assert config["dataset_kwargs"] == {"data_files": {"test": str(data.resolve())}}
        assert config["generation_kwargs"] == {"until": [], "max_gen_toks": doc["max_new_tokens"], "do_sample": False}
        assert config["metric_list"] == [{"metric": "string_match", "aggregation": "mean", "higher_is_better": True}]
        assert jinja2.Template(config["doc_to_text"]).render(**doc) == doc["input"]
        assert jinja2.Template(config["doc_to_target"]).render(**doc) == ", ".join(doc["answers"])
        assert process_results(doc, [" and ".join(doc["answers"])]) == {"string_match": 100.0}
        assert process_results(doc, ["no idea"]) == {"string_match": 0.0}
    _, process_results = _hook(yamls[0])
    doc = ruler.read_records(paths[0])[0]
    assert process_results(doc, [doc["answers"][0]]) == {"string_match": 100.0 / ruler.NEEDLES}


def test_lm_eval_loads_the_tasks_offline(tiny, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager, get_task_dict

    paths = ruler.write_tasks(tmp_path / "data", tiny, tasks=["niah_single"], lengths=[600], num_samples=2)
    ruler.write_lm_eval_tasks(paths, tmp_path / "lm_eval")
    tasks = get_task_dict(["ruler_600"], TaskManager(include_path=str(tmp_path / "lm_eval"), include_defaults=False))
    (task,) = [t for t in _leaves(tasks)]
    docs = list(task.test_docs())
    assert [d["input"] for d in docs] == [r["input"] for r in ruler.read_records(paths[0])]
    assert task.doc_to_text(docs[0]) == docs[0]["input"]
    assert task.process_results(docs[0], [docs[0]["answers"][0]]) == {"string_match": 100.0}


def _leaves(tasks):
    for v in tasks.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


# -- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from flax import nnx

    import t5gemma2_jax as tg
    from t5gemma2_jax.checkpoints.export import flat_params, save_export

    t = tg.preset("tiny").encoder.replace(num_layers=1, layer_types=("full_attention",))
    model = tg.T5Gemma2(tg.preset("tiny", with_vision=False, encoder=t, decoder=t), rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("export")
    save_export(path, model.config, flat_params(model))
    return path


def test_generate_and_score_a_checkpoint_at_two_lengths(tiny_export, tmp_path, capsys):
    script = load_script("ruler")
    data = tmp_path / "ruler"
    written = script.run(["generate", "--tokenizer", tiny_tokenizer_path(), "--lengths", "400,600", "--tasks",
                          "niah_single,qa", "--samples", "2", "--out", str(data), "--lm-eval", str(tmp_path / "lm")])
    assert sorted(Path(p).name for p in written) == ["niah_single_400.jsonl", "niah_single_600.jsonl",
                                                     "qa_400.jsonl", "qa_600.jsonl"]
    assert sorted(p.name for p in (tmp_path / "lm").glob("*.yaml")) == [
        "ruler_niah_single_400.yaml", "ruler_niah_single_600.yaml", "ruler_qa_400.yaml", "ruler_qa_600.yaml"]
    capsys.readouterr()
    preds, out, md = tmp_path / "p.jsonl", tmp_path / "t.json", tmp_path / "t.md"
    # One task at both lengths (the directory's other files moved out): two compiled programs, which
    # evaluate.py below finds again.
    (data / "predictions.jsonl").write_text("{}\n")                     # not a task file: left out
    for f in data.glob("niah_single_*.jsonl"):
        f.rename(tmp_path / f.name)
    table = script.run(["score", "--checkpoint", str(tiny_export), "--data", str(data), "--batch-size", "2",
                        "--max-new-tokens", "6", "--out", str(out), "--markdown", str(md), "--predictions", str(preds),
                        "--no-progress"])
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["task"], r["length"], r["index"]) for r in rows] == [("qa", n, i) for n in (400, 600) for i in (0, 1)]
    for r in rows:
        assert isinstance(r["prediction"], str) and r["score"] == ruler.score(r["prediction"], r)
    assert json.loads(out.read_text()) == table and table["lengths"] == [400, 600]
    assert table["samples"] == {"qa": {"400": 2, "600": 2}} and table == ruler_score.table(rows)
    assert md.read_text() == ruler_score.markdown(table) and capsys.readouterr().out.endswith(md.read_text())
    # scripts/evaluate.py reads a generated file as well: the same completions and scores.
    results = load_script("evaluate").run(["--checkpoint", str(tiny_export), "--data", str(data / "qa_600.jsonl"),
                                           "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"])
    assert results["kind"] == "ruler" and results["examples"] == 2
    assert results["table"]["tasks"] == {"qa": {"600": table["tasks"]["qa"]["600"]}}

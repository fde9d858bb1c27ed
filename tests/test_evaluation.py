"""Evaluation: the metrics against hand-computed values, loading from whatever a run leaves
(a work directory without an export, one step directory), scripts/evaluate.py's results and
per-example files, multiple-choice scoring against `score`, and its one-line errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import t5gemma2_jax as tg
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data.demo import demo_paths
from t5gemma2_jax.evaluation import metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from helpers import small_config  # noqa: E402
from scripts_loader import load_script


# -- metrics -------------------------------------------------------------------------------------

def test_exact_match_folds_case_and_whitespace():
    assert metrics.exact_match(["The  cat ", "a dog"], ["the cat", "a cat"]) == 0.5


def test_rouge_l_is_the_lcs_f_measure():
    # LCS("the cat sat", "the cat sat on the mat") = 3: precision 3/3, recall 3/6, F = 2/3
    assert metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert metrics.rouge_l(["x y"], ["a b"]) == 0.0


def test_bleu_is_the_geometric_mean_of_ngram_precisions():
    # 1..4-gram matches 5/6, 3/5, 2/4, 1/3; equal lengths: no brevity penalty
    want = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(want, abs=1e-3)


def test_chrf_bounds_and_mismatched_lengths():
    assert metrics.chrf(["the same words"], ["the same words"]) == pytest.approx(100.0)
    assert metrics.chrf(["xyz"], ["abc"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.text_metrics(["a", "b"], ["a"])


# -- a run without an export ---------------------------------------------------------------------

# The tests on this trained run are in the slow tier: the run (compiling a train step, two
# checkpoints, the plot) costs more than the default tier can hold.
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from t5gemma2_jax.train import train

    train_file, eval_file = demo_paths("sft")
    cfg = small_config(data={"kind": "sft", "train": train_file, "eval": eval_file, "encoder_length": 64,
                             "decoder_length": 32, "max_images_per_row": 0},
                       model={"with_vision": False},
                       train={"steps": 4, "data_source": "pipeline", "checkpoint_every": 2, "export_at_end": False})
    workdir = tmp_path_factory.mktemp("sft_run")
    train(cfg, workdir)
    assert not (workdir / "export").exists() and (workdir / "loss.png").stat().st_size > 0
    return workdir, eval_file


@pytest.mark.slow
def test_load_reads_a_work_directory_and_a_step_directory(sft_run):
    workdir, _ = sft_run
    src = tg.find_source(workdir)
    assert (src.kind, src.step) == ("run", 4)
    ids = np.array([[2, 10, 11, 12]])
    latest = np.asarray(tg.load(workdir)(ids, ids).logits)
    np.testing.assert_array_equal(latest, np.asarray(tg.load(workdir / "checkpoints" / "4")(ids, ids).logits))
    assert not np.allclose(latest, np.asarray(tg.load(workdir / "checkpoints" / "2")(ids, ids).logits))
    assert tg.load_tokenizer_for(src, tg.load(workdir).config).vocab_size == 512


@pytest.mark.slow
def test_generate_script_samples_a_work_directory_without_export(sft_run, capsys):
    workdir, _ = sft_run
    text = load_script("generate").generate_text(["--checkpoint", str(workdir), "--chat", "--prompt",
                                              "what color is the square?", "--max-new-tokens", "4"])
    assert isinstance(text, str) and text.strip() in capsys.readouterr().out


@pytest.mark.slow
def test_evaluate_script_writes_results_and_predictions(sft_run, tmp_path):
    workdir, eval_file = sft_run
    out, preds = tmp_path / "results.json", tmp_path / "predictions.jsonl"
    load_script("evaluate").run(["--checkpoint", str(workdir), "--data", eval_file, "--generate", "--max-examples", "5",
                             "--max-batches", "2", "--max-new-tokens", "4", "--out", str(out),
                             "--predictions", str(preds), "--no-progress"])
    results = json.loads(out.read_text())
    for key in ("loss", "perplexity", "exact_match", "rouge_l", "bleu", "chrf"):
        assert isinstance(results[key], float), key
    assert results["perplexity"] == pytest.approx(math.exp(results["loss"]))
    assert (results["step"], results["source"], results["kind"], results["examples"]) == (4, "run", "sft", 5)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) == {"prompt", "reference", "prediction"} for r in rows)
    assert rows[0]["reference"] and "<start_of_turn>" in rows[0]["prompt"]
    want = metrics.exact_match([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert results["exact_match"] == want


@pytest.mark.slow
def test_loss_of_pretraining_text_per_ul2_task(sft_run, tmp_path):
    workdir, _ = sft_run
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"the red circle is left of the blue square {i}"}) + "\n"
                            for i in range(6)))
    results = load_script("evaluate").run(["--checkpoint", str(workdir), "--data", str(text), "--no-progress",
                                       "--generate", "--max-new-tokens", "3"])
    assert results["kind"] == "pretrain" and results["tokens"] > 0
    assert set(results["per_task"]) == {"R", "X", "S"}
    assert results["examples"] == 6                       # one prefix-LM split per document


@pytest.mark.slow
def test_choices_are_ranked_by_score(sft_run, tmp_path):
    from t5gemma2_jax.data.prompts import encode_prompt

    workdir, _ = sft_run
    records = [{"prompt": "what color is the square?", "choices": ["red.", "blue.", "green."], "answer": 0},
               {"prompt": "how many shapes are there?", "choices": ["one.", "two."], "answer": "two."},
               {"prompt": "", "choices": ["a", "b"], "answer": 0},                        # skipped: empty
               {"prompt": "x", "choices": ["a", "b"], "answer": 5}]                       # skipped: bad answer
    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    preds = tmp_path / "p.jsonl"
    results = load_script("evaluate").run(["--checkpoint", str(workdir), "--data", str(path), "--chat",
                                       "--predictions", str(preds), "--no-progress"])
    assert results["records"] == 2 and results["skipped"] == {"empty_prompt": 1, "bad_answer": 1, "malformed_json": 1}
    assert results["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    model, tok = tg.load(workdir), tg.load_tokenizer_for(workdir, tg.load(workdir).config)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    for rec, row in zip(records, rows):
        ids = encode_prompt(tok, rec["prompt"], chat=True)[None]
        want = [float(tg.score(model, ids, np.concatenate([tok.encode(c), [tok.special.eos]])[None])[0])
                for c in rec["choices"]]
        np.testing.assert_allclose(row["loglik"], want, rtol=1e-5, atol=1e-4)
        assert row["predicted"] == int(np.argmax(want))
    assert results["accuracy"] == np.mean([r["correct"] for r in rows])


@pytest.mark.slow
def test_bad_evaluation_input_is_one_line(sft_run, tmp_path, capsys):
    workdir, eval_file = sft_run
    evaluate = load_script("evaluate")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"messages\": 3}\n")
    for path, words in ((empty, "no record"), (bad, "no usable example"), (tmp_path / "missing.jsonl", "missing")):
        assert evaluate.main(["--checkpoint", str(workdir), "--data", str(path), "--no-progress"]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert evaluate.main(["--checkpoint", str(tmp_path), "--data", str(bad), "--no-progress"]) == 2
    assert "neither a training work directory" in capsys.readouterr().err
    # Loss batches are split over the devices (8 here): a batch that does not split is refused.
    assert evaluate.main(["--checkpoint", str(workdir), "--data", str(eval_file), "--batch-size", "3",
                          "--no-progress"]) == 2
    assert "error: --batch-size=3 is not divisible by mesh.data x mesh.fsdp = 8" in capsys.readouterr().err


def test_tokenizer_must_fit_the_model_and_be_known(tmp_path):
    from flax import nnx

    from t5gemma2_jax.checkpoints.export import flat_params, save_export
    from t5gemma2_jax.data import tiny_tokenizer_path

    cfg = tg.preset("tiny", with_vision=False)
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    save_export(tmp_path / "export", cfg, flat_params(model))
    src = tg.find_source(tmp_path / "export")
    assert tg.load_tokenizer_for(src, cfg).vocab_size == 512      # the tiny preset's own tokenizer
    def vocab(n):
        return cfg.replace(encoder=cfg.encoder.replace(vocab_size=n), decoder=cfg.decoder.replace(vocab_size=n))

    with pytest.raises(ConfigError, match="records no tokenizer"):
        tg.load_tokenizer_for(src, vocab(1024))
    with pytest.raises(ConfigError, match="512 pieces > model vocab_size 256"):
        tg.load_tokenizer_for(src, vocab(256), tokenizer=tiny_tokenizer_path())


@pytest.mark.slow
@pytest.mark.heavy
def test_sft_exact_match_rises_above_its_start(tmp_path):
    """train.eval_at_start and train.eval_generate_every: the held-out exact match of a short chat
    fine-tune, logged at step 0 and at the end, goes up."""
    from t5gemma2_jax.train import read_metrics, train

    train_file, eval_file = demo_paths("sft")
    cfg = small_config(data={"kind": "sft", "train": train_file, "eval": eval_file, "encoder_length": 96,
                             "decoder_length": 32, "max_images_per_row": 0},
                       model={"with_vision": False}, optim={"learning_rate": 3e-3, "warmup_steps": 10},
                       train={"steps": 120, "data_source": "pipeline", "checkpoint_every": 120, "log_every": 20,
                              "eval_every": 120, "eval_at_start": True, "eval_generate_every": 120,
                              "eval_generate_examples": 32})
    train(cfg, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "eval_exact_match" in r]
    assert [r["step"] for r in rows] == [0, 120]
    assert rows[-1]["eval_exact_match"] > rows[0]["eval_exact_match"]
    assert rows[-1]["eval_rouge_l"] > rows[0]["eval_rouge_l"]
    assert len(rows[-1]["eval_samples"]) == 3 and {"reference", "prediction"} <= set(rows[-1]["eval_samples"][0])
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "eval_loss" in r] == [0, 120]


@pytest.mark.slow
def test_a_checkpoint_loads_and_scores_with_another_attention_backend(sft_run, tmp_path, capsys):
    """A run trained with one backend is scored with another: same logits, the other program; a name
    no backend has is one line, exit 2, from each script that takes it."""
    workdir, eval_file = sft_run
    ids = np.array([[2, 10, 11, 12]])
    trained = tg.load(workdir)
    other = tg.load(workdir, attention_backend="blockwise")
    assert trained.config.attention_backend == "auto" and other.config.attention_backend == "blockwise"
    np.testing.assert_allclose(np.asarray(other(ids, ids).logits), np.asarray(trained(ids, ids).logits), atol=1e-5)
    out = tmp_path / "results.json"
    assert load_script("evaluate").main(["--checkpoint", str(workdir), "--data", eval_file, "--max-batches", "1",
                                         "--attention-backend", "dense", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["config"]["model"]["attention_backend"] == "dense"
    capsys.readouterr()
    for script, command, args in (("evaluate", [], ["--data", eval_file]), ("ruler", ["score"], ["--data", eval_file]),
                                  ("generate", [], ["--prompt", "hi"])):
        argv = [*command, "--checkpoint", str(workdir), *args, "--attention-backend", "fast"]
        assert load_script(script).main(argv) == 2, script
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "attention_backend" in err, (script, err)

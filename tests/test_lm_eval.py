"""The lm-evaluation-harness model (`t5gemma2_jax.evaluation.lm_eval`): the same per-sample
log-likelihoods and accuracy as the harness' own `hf` model with `backend=seq2seq` on a tiny random
checkpoint in the Hugging Face format, `generate_until` equal to `generate`, a 2-device mesh equal
to one device, and the command line end to end. Tasks are YAML files over local JSONL files; the
harness and `datasets` are kept offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# `datasets` and `huggingface_hub` read these when imported: no task may reach the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data import Tokenizer, tiny_tokenizer_path
from t5gemma2_jax.data.prompts import pad_prompts
from t5gemma2_jax.evaluation import lm_eval as tg_lm_eval
from t5gemma2_jax.generation.texts import completion_ids
from xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 24   # short, so that the rolling task's documents span several windows
QUESTIONS = ["The quick brown", "Question: what is in the picture?", "Numbers like 0 1 2",
             "The weather today is", "User: hello"]
DOCS = ["The weather today is sunny with a light breeze, and the river flows slowly through the town.",
        "Numbers like 0 1 2 3 4 5 are split into digits.",
        "Data pipelines must be correct, resumable and fast; bad records are counted and skipped. " * 2]


# -- without a model -------------------------------------------------------------------------------

def test_bucket_lengths_are_few_and_waste_little():
    sizes = [tg_lm_eval.bucket(n) for n in range(1, 4097)]
    assert all(b >= n and b - n < max(16, n / 4) for n, b in zip(range(1, 4097), sizes))
    assert sizes == sorted(sizes) and tg_lm_eval.bucket(1) == 16 and tg_lm_eval.bucket(1000) == 1024
    assert len(set(sizes)) <= 8 * 9   # about eight shapes per doubling from 16 to 4096


def test_encoder_inputs_are_bos_then_text_left_truncated_with_the_mode_after_bos():
    from types import SimpleNamespace

    tok = Tokenizer(tiny_tokenizer_path())
    s = tok.special
    lm = SimpleNamespace(tok=tok, add_bos_token=True, _bos_text=tok.id_to_piece(s.bos), max_length=6, mode_id=None)
    text = list(tok.encode("The quick brown fox"))
    assert tg_lm_eval.T5Gemma2LM.tok_encode(lm, "The quick brown fox") == [s.bos] + text
    assert tg_lm_eval.T5Gemma2LM.tok_encode(lm, "<bos>The quick brown fox") == [s.bos] + text
    assert tg_lm_eval.T5Gemma2LM.tok_encode(lm, "The quick brown fox", add_special_tokens=False) == text
    assert tg_lm_eval.T5Gemma2LM._encoder_ids(lm, [s.bos, 20, 21]) == [s.bos, 20, 21]
    assert tg_lm_eval.T5Gemma2LM._encoder_ids(lm, [s.bos, *range(20, 30)]) == list(range(24, 30))
    lm.mode_id = s.modes["[S2S]"]
    assert tg_lm_eval.T5Gemma2LM._encoder_ids(lm, [s.bos, 20, 21]) == [s.bos, lm.mode_id, 20, 21]
    assert tg_lm_eval.T5Gemma2LM._encoder_ids(lm, [20, 21]) == [lm.mode_id, 20, 21]
    assert tg_lm_eval.T5Gemma2LM._encoder_ids(lm, list(range(20, 30))) == [lm.mode_id, *range(25, 30)]


def test_command_line_and_model_argument_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = tg_lm_eval.main(["--model_args", f"pretrained={missing},batch_size=4", "--tasks", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: pretrained {missing}: no such directory\n", err
    rc = tg_lm_eval.main(["--model_args", "dtype=float32", "--tasks", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --model_args: pretrained=PATH is required") and err.count("\n") == 1
    with pytest.raises(ConfigError, match=r"^model_args: unknown argument\(s\) \['temprature'\]"):
        tg_lm_eval.T5Gemma2LM(pretrained=str(missing), temprature=1.0)
    with pytest.raises(ConfigError, match=r"^batch_size: 'auto' is not supported"):
        tg_lm_eval.T5Gemma2LM(pretrained=str(missing), batch_size="auto")


# -- a tiny random checkpoint in the Hugging Face format, with a tokenizer both sides read ----------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """`save_hf` of a random tiny text model, the tiny SentencePiece model beside it (what our
    loader reads) and the same tokenizer converted for transformers with bos added, as Gemma's is."""
    from transformers import GemmaTokenizer

    path = tmp_path_factory.mktemp("hf")
    tg.save_hf(tg.T5Gemma2(tg.preset("tiny", with_vision=False), rngs=nnx.Rngs(3)), path)
    shutil.copy(tiny_tokenizer_path(), path / "tokenizer.model")
    GemmaTokenizer.from_pretrained(path, add_bos_token=True).save_pretrained(path)
    return path


def _greedy_continuations(path: Path, prompts: list[str], n: int) -> list[tuple[str, list[int]]]:
    """`generate`'s greedy `n` tokens after each prompt (those before eos), decoded and as ids."""
    model, tok = tg.load(path, text_only=True), Tokenizer(tiny_tokenizer_path())
    ids, mask = pad_prompts([np.concatenate([[tok.special.bos], tok.encode(p)]) for p in prompts], tok.special.pad)
    rows = np.asarray(tg.generate(model, ids, mask, max_new_tokens=n))
    out = []
    for r in rows:
        kept = [int(t) for t in completion_ids(r, model.config.eos_token_id, model.config.pad_token_id)]
        out.append((tok.decode(kept), kept))
    return out


@pytest.fixture(scope="module")
def tasks(checkpoint, tmp_path_factory) -> Path:
    """Task YAMLs over JSONL files: multiple choice (one choice of each question is the model's own
    greedy continuation, so is_greedy is true somewhere), rolling log-likelihood, generation."""
    d = tmp_path_factory.mktemp("tasks")
    tok = Tokenizer(tiny_tokenizer_path())
    greedy = _greedy_continuations(checkpoint, QUESTIONS, 3)
    records = []
    for i, (q, (text, ids)) in enumerate(zip(QUESTIONS, greedy)):
        choices = [" fox", " a red circle", " 3 4 5", " sunny"]
        if ids and [int(t) for t in tok.encode(text)] == ids:   # the text encodes back to the same tokens
            choices[(i + 1) % 4] = text
        records.append({"question": q, "choices": choices, "answer": i % 4})
    _jsonl(d / "mc.jsonl", records)
    _jsonl(d / "docs.jsonl", [{"text": t} for t in DOCS])
    common = f"dataset_path: json\ntest_split: test\n"

    def data(name):
        return f"dataset_kwargs:\n  data_files:\n    test: {d / name}\n  cache_dir: {d / 'cache'}\n"

    (d / "mc.yaml").write_text(
        "task: tg_mc\n" + common + data("mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "ppl.yaml").write_text(
        "task: tg_ppl\n" + common + data("docs.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (d / "gen.yaml").write_text(
        "task: tg_gen\n" + common + data("mc.jsonl") + "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{choices[answer]}}'\n"
        "generation_kwargs:\n  until: [',']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return d


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _evaluate(model, model_args: str, tasks: Path, names: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                   batch_size=4, device="cpu")


def _per_sample(results: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_log_likelihoods_and_accuracy_match_the_harness_hf_seq2seq_model(checkpoint, tasks):
    names = ["tg_mc", "tg_ppl"]
    ref = _evaluate("hf", f"pretrained={checkpoint},backend=seq2seq,dtype=float32,max_length={MAX_LENGTH}",
                    tasks, names)
    ours = _evaluate("t5gemma2_jax", f"pretrained={checkpoint},dtype=float32,max_length={MAX_LENGTH},mesh=1",
                     tasks, names)
    for want, got in zip(_per_sample(ref, "tg_mc"), _per_sample(ours, "tg_mc")):
        np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in want], atol=1e-3)
        assert [g for _, g in got] == [g for _, g in want]
    greedy = [g for doc in _per_sample(ours, "tg_mc") for _, g in doc]
    assert any(greedy) and not all(greedy)   # both answers of is_greedy are compared
    want = [ll for (ll,) in _per_sample(ref, "tg_ppl")]
    got = [ll for (ll,) in _per_sample(ours, "tg_ppl")]
    np.testing.assert_allclose(got, want, atol=1e-3)
    tok = Tokenizer(tiny_tokenizer_path())
    assert len(tok.encode(DOCS[2])) > 2 * MAX_LENGTH   # several rolling windows
    for key in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tg_mc"][key] == ref["results"]["tg_mc"][key]
    np.testing.assert_allclose(ours["results"]["tg_ppl"]["bits_per_byte,none"],
                               ref["results"]["tg_ppl"]["bits_per_byte,none"], rtol=1e-5)


@pytest.fixture(scope="module")
def one_device(checkpoint):
    return tg_lm_eval.T5Gemma2LM(pretrained=str(checkpoint), batch_size=4, max_length=MAX_LENGTH, mesh=1)


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.slow
def test_generate_until_is_generate_cut_at_the_stop_sequence(checkpoint, one_device):
    n = 8
    texts = [text for text, _ in _greedy_continuations(checkpoint, QUESTIONS, n)]
    stop = next(t[2:4] for t in texts if len(t) >= 4)   # a stop string that occurs in an output
    want = [t.split(stop)[0] for t in texts]
    assert any(w != t for w, t in zip(want, texts))
    got = one_device.generate_until(_instances("generate_until", [(q, {"until": [stop], "max_gen_toks": n})
                                                                  for q in QUESTIONS]))
    assert got == want
    sampled = dict(until=[stop], max_gen_toks=n, do_sample=True, temperature=2.0)
    draws = [one_device.generate_until(_instances("generate_until", [(q, sampled) for q in QUESTIONS]))
             for _ in range(2)]
    assert draws[0] == draws[1] and draws[0] != got   # seeded, and not the greedy texts


@pytest.mark.slow
def test_a_two_device_mesh_gives_the_numbers_of_one_device(checkpoint, one_device):
    import jax

    assert len(jax.devices()) >= 2   # tests/conftest.py fakes eight CPU devices
    two = tg_lm_eval.T5Gemma2LM(pretrained=str(checkpoint), batch_size=4, max_length=MAX_LENGTH, mesh=2)
    assert two.mesh.size == 2 and two.batch_size == 4
    pairs = _instances("loglikelihood", [(q, " a red circle") for q in QUESTIONS] + [("", "hello there")])
    docs = _instances("loglikelihood_rolling", [(t,) for t in DOCS])
    prompts = _instances("generate_until", [(q, {"until": ["\n"], "max_gen_toks": 8}) for q in QUESTIONS])
    a, b = one_device.loglikelihood(pairs), two.loglikelihood(pairs)
    np.testing.assert_allclose([x for x, _ in b], [x for x, _ in a], atol=1e-4)
    assert [g for _, g in b] == [g for _, g in a]
    np.testing.assert_allclose(two.loglikelihood_rolling(docs), one_device.loglikelihood_rolling(docs), atol=1e-4)
    assert two.generate_until(prompts) == one_device.generate_until(prompts)


@pytest.mark.slow
def test_an_export_scores_as_its_hugging_face_directory(checkpoint, one_device, tmp_path):
    from t5gemma2_jax.checkpoints.export import flat_params

    model = tg.load(checkpoint, text_only=True)
    assert tg.load(checkpoint, text_only=True, attention_backend="dense").config.attention_backend == "dense"
    tg.save_export(tmp_path / "export", model.config, flat_params(model))
    # Scored with another attention backend than the one it was saved with: the same numbers.
    export = tg_lm_eval.T5Gemma2LM(pretrained=str(tmp_path / "export"), batch_size=4, max_length=MAX_LENGTH,
                                   mesh=1, attention_backend="blockwise")
    assert model.config.attention_backend == "auto" and export.model.config.attention_backend == "blockwise"
    pairs = _instances("loglikelihood", [(q, " a red circle") for q in QUESTIONS])
    np.testing.assert_allclose([x for x, _ in export.loglikelihood(pairs)],
                               [x for x, _ in one_device.loglikelihood(pairs)], atol=1e-5)


@pytest.mark.slow
def test_the_command_line_writes_results_and_samples(checkpoint, tasks, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": xla_flags(1)}
    proc = subprocess.run(
        [sys.executable, "-m", "t5gemma2_jax.evaluation.lm_eval", "--model_args",
         f"pretrained={checkpoint},batch_size=4,max_length={MAX_LENGTH}", "--tasks", "tg_mc,tg_gen",
         "--include_path", str(tasks), "--output_path", str(out), "--log_samples", "--limit", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = out.rglob("results_*.json")
    data = json.loads(results.read_text())
    assert data["config"]["model"] == "t5gemma2_jax"
    assert set(data["results"]) == {"tg_mc", "tg_gen"} and data["n-samples"]["tg_mc"]["effective"] == 3
    assert 0 <= data["results"]["tg_mc"]["acc,none"] <= 1
    samples = {p.name.split("_2")[0]: [json.loads(line) for line in p.read_text().splitlines()]
               for p in out.rglob("samples_*.jsonl")}
    assert len(samples["samples_tg_mc"]) == 3 and len(samples["samples_tg_gen"]) == 3
    # the package itself does not need the harness
    check = subprocess.run([sys.executable, "-c", "import sys, t5gemma2_jax; assert 'lm_eval' not in sys.modules"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr

"""The thin CLIs over the package: ahead-of-time compilation, the benchmark, generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.export import flat_params, save_export
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_aot_compile_on_the_local_devices(tmp_path, capsys):
    """Without a topology the trainer's own step compiles for this machine's 8 fake devices."""
    out = tmp_path / "aot.jsonl"
    result = load_script("aot_compile").main([
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--json", str(out), "model.scan_layers=false",
        "data.max_images_per_row=0", "data.encoder_length=32", "data.decoder_length=16",
        "model.encoder.num_layers=2", "model.decoder.num_layers=2", "model.attention_backend=dense"])
    assert result["chips"] == 8 and result["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    assert result["memory_per_chip"]["total"] > 0 and result["generate_memory_per_chip"]["total"] > 0
    # Unscanned and dense: XLA's count is comparable to the analytic one (matmuls only); at width 64
    # the elementwise work and the optimizer, which the analytic count leaves out, add about 10%.
    assert result["flops_comparable"] and 1.0 < result["compiled_flops_per_chip"] / result["expected_flops_per_chip"] < 1.25
    assert json.loads(out.read_text().splitlines()[-1])["compile_seconds"] == result["compile_seconds"]
    assert "x the analytic count" in capsys.readouterr().out


def test_aot_compile_reports_a_program_that_cannot_fit(tmp_path, monkeypatch, capsys):
    """The TPU compiler refuses a program above the chip's HBM: that is a result (not fitting,
    with the state's share per chip), not a crash."""
    import jax

    from t5gemma2_jax.train import Trainer

    def refuse(self, **kw):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                                          "for HLO temporaries (16.71G) exceeds available HBM (15.75G).\nmore")

    monkeypatch.setattr(Trainer, "compile", refuse)
    out = tmp_path / "aot.jsonl"
    aot = load_script("aot_compile")
    result = aot.main(["--config", str(ROOT / "configs" / "tiny_lora.yaml"), "--json", str(out), "--no-generate"])
    assert result["fits"] is False and "HLO temporaries (16.71G)" in result["error"]
    assert result["state_bytes_per_chip"] * result["chips"] > result["checkpoint_bytes"] > 0   # LoRA: no base
    assert "does not fit: RESOURCE_EXHAUSTED" in capsys.readouterr().out
    assert json.loads(out.read_text())["fits"] is False


@pytest.mark.slow
@pytest.mark.heavy
def test_benchmark_times_the_trainers_step(tmp_path):
    out = tmp_path / "bench.jsonl"
    result = load_script("benchmark").main(["--preset", "tiny", "--encoder-length", "32", "--decoder-length", "16",
                                        "--steps", "1", "--new-tokens", "4", "--json", str(out), "--vs-hf",
                                        "--breakdown"])
    assert result["hf_train_step_s"] > 0 and result["hf_generate_s"] > 0
    assert result["forward_s"] > 0 and result["update_s"] > 0 and "backward_over_forward" in result
    assert result["train_peak_host_memory_gb"] > 0.1 and result["hf_train_peak_host_memory_gb"] > 0.1
    assert result["train_step_s"] > 0 and result["generate_s"] > 0 and result["train_tflops"] > 0
    assert result["attention"] == "auto" and result["peak_host_memory_gb"] > 0.1
    assert json.loads(out.read_text())["preset"] == "tiny"


@pytest.mark.slow
def test_benchmark_calls_times_the_plain_call_beside_jit_and_transformers(tmp_path):
    out = tmp_path / "calls.jsonl"
    assert load_script("benchmark_calls").main(["--preset", "tiny", "--encoder-length", "32", "--decoder-length", "8",
                                                "--reps", "1", "--ways", "plain", "jit", "--vs-hf",
                                                "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"], r["way"]) for r in rows] == [("auto", "plain"), ("auto", "jit"), ("transformers", "eager")]
    assert all(r["median"] > 0 and r["first"] > 0 for r in rows)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("export")
    model = tg.T5Gemma2(tg.preset("tiny", with_vision=False), rngs=nnx.Rngs(0))
    save_export(path, model.config, flat_params(model))
    return path


@pytest.mark.parametrize("method", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_generate_from_an_export(tiny_export, capsys, method):
    text = load_script("generate").generate_text(["--checkpoint", str(tiny_export), "--prompt", "a red circle",
                                     "--mode", "[S2S]", "--max-new-tokens", "5", "--method", method])
    assert isinstance(text, str) and text.strip() in capsys.readouterr().out


def test_generate_names_bad_input_on_one_line(tiny_export, capsys):
    generate = load_script("generate")
    assert generate.main(["--checkpoint", str(tiny_export), "--prompt", "x", "--mode", "[XYZ]"]) == 2
    assert capsys.readouterr().err == "error: --mode: '[XYZ]' is not a mode token of this tokenizer " \
                                      "(['[NLG]', '[NLU]', '[S2S]'])\n"
    assert generate.main(["--checkpoint", str(tiny_export.parent), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint") and "neither a training work directory" in err and err.count("\n") == 1


@pytest.mark.slow
def test_generate_with_an_adapter_and_from_a_lora_run(tiny_export, tmp_path, capsys):
    """--adapter applies a PEFT directory unmerged (on a quantised base with --quantize-base), and
    a LoRA run's work directory brings its base (train.init_from) and adapter by itself."""
    from t5gemma2_jax.data import Tokenizer, tiny_tokenizer_path
    from t5gemma2_jax.data.prompts import encode_prompt
    from t5gemma2_jax.experiment import from_dict

    model = tg.load_export(tiny_export)
    tg.apply_lora(model, rank=2)
    for n, (_, lora) in enumerate(tg.adapters.lora_sites(model)):
        lora.b.set_value(0.5 * np.random.default_rng(n).normal(size=lora.b.shape))
    tg.save_peft(model, tmp_path / "adapter")
    tok = Tokenizer(tiny_tokenizer_path())
    ids = encode_prompt(tok, "a red circle", mm_tokens_per_image=model.config.mm_tokens_per_image)[None]
    from t5gemma2_jax.data.prompts import default_suppress_tokens

    # generate.py keeps sentinels and other special ids out of completions by default
    want = [int(t) for t in np.asarray(tg.generate(model, ids, max_new_tokens=5,
                                                   suppress_tokens=default_suppress_tokens(tok)))[0]
            if t not in (model.config.eos_token_id, model.config.pad_token_id)]
    generate = load_script("generate")
    args = ["--prompt", "a red circle", "--max-new-tokens", "5"]
    assert generate.generate_text(["--checkpoint", str(tiny_export), "--adapter", str(tmp_path / "adapter"), *args]) \
        == tok.decode(want)
    assert generate.generate_text(["--checkpoint", str(tiny_export), *args]) != tok.decode(want)   # it applied
    assert isinstance(generate.generate_text(["--checkpoint", str(tiny_export), "--adapter", str(tmp_path / "adapter"),
                                              "--quantize-base", "int8", *args]), str)

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for f in (tmp_path / "adapter").iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    cfg = from_dict({"model": {"preset": "tiny", "with_vision": False}, "data": {"max_images_per_row": 0},
                     "lora": {"rank": 2},
                     "train": {"init_from": str(tiny_export)}})
    (run / "config.yaml").write_text(cfg.to_yaml())
    assert generate.generate_text(["--checkpoint", str(run), *args]) == tok.decode(want)
    capsys.readouterr()
    random_base = from_dict({"model": {"preset": "tiny", "with_vision": False}, "data": {"max_images_per_row": 0},
                             "lora": {"rank": 2}})
    (run / "config.yaml").write_text(random_base.to_yaml())
    assert generate.main(["--checkpoint", str(run), *args]) == 2
    assert "trained on a random base" in capsys.readouterr().err


def test_prompts_are_laid_out_like_the_training_data():
    from t5gemma2_jax.data import load_tokenizer, DataConfig
    from t5gemma2_jax.data.prompts import encode_prompt, pad_prompts
    from t5gemma2_jax.data.sft import ChatTemplate

    tok = load_tokenizer(DataConfig())
    s = tok.special
    plain = encode_prompt(tok, "a red circle", mode="[S2S]")
    np.testing.assert_array_equal(plain, np.concatenate([[s.bos, s.modes["[S2S]"]], tok.encode("a red circle")]))
    chat = encode_prompt(tok, "hi <start_of_image> there", images=1, mm_tokens_per_image=4, chat=True)
    t = ChatTemplate(tok)
    body = np.concatenate([tok.encode("hi "), tok.image_block(4), tok.encode(" there")])
    np.testing.assert_array_equal(chat, np.concatenate([[s.bos], t.render_turn("user", body), t.generation_prompt]))
    first = encode_prompt(tok, "x", images=2, mm_tokens_per_image=4)      # unmarked images come first
    assert (first == s.image).sum() == 8 and first[1] == tok.image_block(4)[0]
    with pytest.raises(tg.ConfigError, match="1 <start_of_image> markers but 2 images"):
        encode_prompt(tok, "a <start_of_image>", images=2, mm_tokens_per_image=4)
    ids, mask = pad_prompts([plain, first])
    assert ids.shape == mask.shape == (2, max(len(plain), len(first))) and mask.sum() == len(plain) + len(first)

"""The fine-tuning recipe at the real 270M size, through the command lines a user runs: a random
Gemma 3 270M checkpoint (google/gemma-3-270m's shape, written by transformers) adapted with
`scripts/adapt_gemma3.py --text-only`, then `scripts/train.py` with `configs/270m-270m_pretrain.yaml`
changing only data, shape, precision and length. That config's backend is splash (Pallas interpret
mode off TPU): the run trains, evaluates at step 0 and at the end, checkpoints and exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xla_env import user_env
from t5gemma2_jax.train import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=512, max_position_embeddings=32768, bos_token_id=2, eos_token_id=[1, 106],
                   pad_token_id=0)


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = user_env()      # one device and XLA's default code generation, as a user's CPU run
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_adapt_then_fine_tune_with_the_270m_config(tmp_path):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path
    from t5gemma2_jax.loading import load

    torch.manual_seed(0)
    gemma3 = tmp_path / "gemma-3-270m"
    Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_270M)).to(torch.bfloat16).save_pretrained(gemma3)
    adapted = tmp_path / "t5g2-270m"
    _cli("adapt_gemma3.py", "--gemma3", str(gemma3), "--out", str(adapted), "--text-only")

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Record {i}: the river flows slowly through the town, and the "
                                                "weather today is sunny with a light breeze."}) + "\n"
                            for i in range(64)))
    workdir = tmp_path / "run"
    _cli("train.py", "--config", str(ROOT / "configs" / "270m-270m_pretrain.yaml"), "--workdir", str(workdir),
         f"train.init_from={adapted}", f"data.train={data}", f"data.eval={data}",
         f"data.tokenizer={tiny_tokenizer_path()}",
         "model.dtype=float32", "data.encoder_length=128", "data.decoder_length=64", "data.batch_size=2",
         "data.max_images_per_row=0", "data.num_workers=2", "train.microbatches=1", "train.steps=2",
         "train.eval_every=2", "train.eval_steps=1", "train.progress_bar=false")

    rows = read_metrics(workdir)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sorted(evals) == [0, 2] and all(v == v and v > 0 for v in evals.values()), evals
    assert len(losses) >= 1 and all(v == v for v in losses), rows
    assert (workdir / "checkpoints" / "2").is_dir()
    model = load(workdir / "export")
    assert model.config.attention_backend == "splash" and model.config.decoder.hidden_size == 640

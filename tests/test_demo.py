"""`make demo` (scripts/demo.py): its two kinds of batch fit one train step; the default run
answers questions about held-out scenes well above chance, and a rerun resumes instead of
training again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xla_env import user_env
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_interleaves_ul2_and_question_batches_of_one_shape():
    from t5gemma2_jax.data import load_tokenizer
    from t5gemma2_jax.data.demo import demo_split_paths
    from t5gemma2_jax.train import load_config

    demo = load_script("demo")
    paths = demo_split_paths()
    cfg = load_config(demo.CONFIG, [f"data.train={paths['pretrain_train']}", f"data.eval={paths['pretrain_eval']}"])
    batches = demo._batches(cfg, paths)
    try:
        ul2, qa, ul2_again = (next(batches) for _ in range(3))
    finally:
        batches.close()
    assert {k: (v.shape, v.dtype) for k, v in ul2.items()} == {k: (v.shape, v.dtype) for k, v in qa.items()}
    assert ul2["encoder_input_ids"].shape == (cfg.data.batch_size, cfg.data.encoder_length)
    turn = load_tokenizer(cfg.data).special.start_of_turn   # question batches are chat turns
    assert (qa["encoder_input_ids"] == turn).any() and not (ul2["encoder_input_ids"] == turn).any()
    assert ul2["image_mask"].any() and not qa["image_mask"].any()    # the scenes' pictures; text questions
    assert not (ul2_again["encoder_input_ids"] == turn).any()


@pytest.mark.slow
@pytest.mark.heavy
def test_the_default_demo_answers_held_out_questions_well_above_chance(tmp_path):
    """The run `make demo` makes (one CPU device, as there): about two minutes on 2 cores."""
    env = user_env()
    env["PYTHONPATH"] = str(ROOT)

    def run() -> dict:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--workdir", str(tmp_path / "w"),
                        "--json", str(tmp_path / "r.json")], check=True, env=env, timeout=900,
                       stdout=subprocess.DEVNULL)
        return json.loads((tmp_path / "r.json").read_text())

    r = run()
    assert r["last_loss"] < r["first_loss"] / 4
    assert r["accuracy"] >= r["chance"] + 0.3, r
    assert r["exact_match"] >= 0.25, r
    for kind in ("background", "shape", "relation"):    # the lookups it learns first
        assert r["by_kind"][kind]["accuracy"] >= r["by_kind"][kind]["chance"] + 0.3, (kind, r["by_kind"])
    metrics = (tmp_path / "w" / "metrics.jsonl").read_text()
    again = run()                                       # the run is complete: straight to the questions
    assert (tmp_path / "w" / "metrics.jsonl").read_text() == metrics
    assert (again["accuracy"], again["exact_match"]) == (r["accuracy"], r["exact_match"])

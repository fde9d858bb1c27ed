#!/usr/bin/env python
"""The whole thing in one command: train the tiny model on the demo data, checkpoint it,
generate from it, and show what it learned.

    python scripts/demo.py [--workdir workdirs/demo] [--steps 200]

The demo data are synthetic scenes of coloured shapes with captions ("a blue circle left of a
yellow square on a black background."); the tiny model (8+8 layers, width 64) learns their
language in a couple of hundred CPU steps. Besides the captions it trains on question/answer
records (a caption, then questions about it with their answers). Held-out captions are cut in half
and the model completes them ([S2S] prefix-LM mode of its UL2 pretraining); questions about
held-out scenes are answered by ranking the candidate answers by log-likelihood and by greedy
generation, and the accuracy is printed next to the chance rate. Rerunning resumes or, when the
run is complete, goes straight to generation.
"""

from __future__ import annotations

import sys

import argparse
import json
import logging
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "workdirs" / "demo"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--examples", type=int, default=4, help="held-out captions to complete")
    p.add_argument("--questions", type=int, default=100, help="held-out questions to answer")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from t5gemma2_jax.data import load_tokenizer
    from t5gemma2_jax.data.demo import demo_split_paths
    from t5gemma2_jax.train import load_config, load_export, read_metrics, train

    paths = demo_split_paths()
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"train.steps={a.steps}", f"train.checkpoint_every={a.steps}", f"train.eval_every={a.steps}",
                       f"data.train={paths['pretrain_train']},{paths['qa_train']}",
                       f"data.eval={paths['pretrain_eval']}"])
    print(f"training the tiny model for {a.steps} steps on the demo data -> {a.workdir}")
    train(cfg, a.workdir)
    rows = read_metrics(a.workdir)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    print(f"\ntrain loss {losses[0][1]:.2f} (step {losses[0][0]}) -> {losses[-1][1]:.2f} (step {losses[-1][0]})"
          + (f"; held-out loss {evals[-1][1]:.2f}" if evals else ""))

    model = load_export(Path(a.workdir) / "export")
    tok = load_tokenizer(cfg.data)
    completions = _complete_captions(model, tok, paths["pretrain_eval"], a.examples)
    return {"first_loss": losses[0][1], "last_loss": losses[-1][1], "completions": completions,
            **_answer_questions(model, tok, paths, a.questions)}


def _complete_captions(model, tok, eval_path: str, n: int) -> list[str]:
    """Held-out captions cut in half; the model writes the rest up to the caption's full stop."""
    from t5gemma2_jax.data.prompts import encode_prompt
    from t5gemma2_jax.generation import generate_texts

    captions = []
    with open(eval_path) as f:
        for line in f:
            text = json.loads(line)["text"].replace("<start_of_image>", "").strip()
            if text and not text.startswith("<") and len(text.split()) >= 6:
                captions.append(text.split(". ")[0].rstrip(".") + ".")
            if len(captions) == n:
                break
    prompts = [" ".join(c.split()[: len(c.split()) // 2]) for c in captions]
    texts = generate_texts(model, tok, [encode_prompt(tok, q, mode="[S2S]") for q in prompts],
                           max_new_tokens=32, stop=["."])
    print("\nheld-out captions, first half given, the model writes the rest (greedy, up to the first '.'):")
    for q, c, text in zip(prompts, captions, texts):
        print(f"  prompt : {q}\n  model  : {text.strip()}.\n  actual : {c[len(q):].strip()}\n")
    return texts


def _answer_questions(model, tok, paths: dict, n: int) -> dict:
    """Questions about held-out scenes, answered two ways: the candidate answer of highest
    log-likelihood, and the greedy completion up to its full stop (exact match)."""
    from t5gemma2_jax.data.demo import qa_items
    from t5gemma2_jax.data.prompts import encode_prompt
    from t5gemma2_jax.generation import generate_texts, score_candidates

    seen = set()
    for split in ("pretrain_train", "qa_train"):
        with open(paths[split]) as f:
            seen.update(json.loads(line)["text"].replace("<start_of_image>", "").split(" background.")[0]
                        + " background." for line in f)
    items = qa_items(n, exclude=seen)
    prompts = [encode_prompt(tok, f"{q.context} {q.question}", mode="[S2S]") for q in items]
    lls = score_candidates(model, prompts, [[tok.encode(c) for c in q.candidates] for q in items])
    ranked = [q.candidates[int(np.argmax(ll))] for q, ll in zip(items, lls)]
    greedy = [t.strip() + "." for t in generate_texts(model, tok, prompts, max_new_tokens=12, stop=["."])]
    accuracy = float(np.mean([r == q.answer for r, q in zip(ranked, items)]))
    exact = float(np.mean([g == q.answer for g, q in zip(greedy, items)]))
    chance = float(np.mean([1 / len(q.candidates) for q in items]))
    print(f"questions about {len(items)} held-out scenes (colour, shape, background, relation):")
    for q, r, g in list(zip(items, ranked, greedy))[:6]:
        print(f"  {q.context} {q.question}\n    ranked: {r:<26} greedy: {g:<26} answer: {q.answer}")
    print(f"\nanswer accuracy {accuracy:.0%} (log-likelihood ranking of the candidate answers; "
          f"chance {chance:.0%}); greedy exact match {exact:.0%}")
    return {"accuracy": accuracy, "exact_match": exact, "chance": chance}


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

#!/usr/bin/env python
"""The whole thing in one command: train a small model on the demo data, checkpoint it, generate
from it, and show what it learned.

    python scripts/demo.py [--workdir workdirs/demo] [--steps 300] [--json results.json]

The demo data are synthetic scenes of coloured shapes with captions ("a blue circle left of a
yellow square on a black background."), half of them with their picture. The model
(configs/tiny_demo.yaml: the tiny preset made wide and shallow, 2+2 layers of width 128, with its
SigLIP tower) trains on two kinds of batch in turn: UL2 pretraining on the captions, pictures and
descriptions, and supervised fine-tuning on questions about such scenes (the caption and a
question in the encoder, the answer as the decoder target). Then held-out captions are cut in
half and the model completes them ([S2S] prefix-LM mode of its UL2 pretraining), and 100
questions about held-out scenes (new combinations of the same colours, shapes, backgrounds and
relations) are answered by ranking the candidate answers by log-likelihood and by greedy
generation; the accuracy is printed next to the chance rate, by kind of question. Rerunning
resumes or, when the run is complete, goes straight to generation.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import sys

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_demo.yaml"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "workdirs" / "demo"))
    p.add_argument("--steps", type=int, default=None, help="train steps (default: configs/tiny_demo.yaml's)")
    p.add_argument("--examples", type=int, default=4, help="held-out captions to complete")
    p.add_argument("--questions", type=int, default=100, help="held-out questions to answer")
    p.add_argument("--json", default=None, help="also write the results (losses, accuracies) to this file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from t5gemma2_jax import storage
    from t5gemma2_jax.data import load_tokenizer
    from t5gemma2_jax.data.demo import demo_split_paths
    from t5gemma2_jax.train import load_config, load_export, read_metrics, train

    paths = demo_split_paths()
    steps = a.steps or load_config(CONFIG).train.steps
    cfg = load_config(CONFIG, [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={steps}",
                               f"data.train={paths['pretrain_train']}", f"data.eval={paths['pretrain_eval']}"])
    print(f"training for {steps} steps (UL2 pretraining and question-answering batches in turn) -> {a.workdir}")
    train(cfg, a.workdir, batches=_batches(cfg, paths))
    rows = read_metrics(a.workdir)
    losses = [(r["step"], r["loss_avg"]) for r in rows if "loss_avg" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    last = losses[-1][0]
    window = f"steps {max(1, last - cfg.train.log_every + 1)}-{last}" if last > 1 else "step 1"
    print(f"\ntrain loss {losses[0][1]:.2f} (step 1) -> {losses[-1][1]:.2f} (mean of {window}, both kinds of batch)"
          + (f"; held-out UL2 loss {evals[-1][1]:.2f}" if evals else ""))

    model = load_export(storage.join(a.workdir, "export"))
    tok = load_tokenizer(cfg.data)
    completions = _complete_captions(model, tok, paths["pretrain_eval"], a.examples)
    results = {"steps": last, "first_loss": losses[0][1], "last_loss": losses[-1][1],
               "eval_loss": evals[-1][1] if evals else None, "completions": completions,
               **_answer_questions(model, tok, paths, a.questions)}
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


def _batches(cfg, paths: dict):
    """UL2 pretraining batches of the scenes (the config's data) and SFT batches of the question
    records (the same lengths), one of each in turn."""
    from t5gemma2_jax.data import make_pipeline
    from t5gemma2_jax.data.demo import MixedBatches

    qa = dataclasses.replace(cfg.data, kind="sft", train=paths["qa_train"], eval=None)
    return MixedBatches([make_pipeline(cfg.data, "train"), make_pipeline(qa, "train")], pattern=(0, 1))


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
    """Questions about held-out scenes, asked as in training (the caption and the question in the
    user turn), answered two ways: the candidate answer of highest log-likelihood, and the greedy
    completion up to its full stop (exact match)."""
    from t5gemma2_jax.data.demo import QA_KINDS, qa_items, split_captions
    from t5gemma2_jax.data.prompts import encode_prompt
    from t5gemma2_jax.generation import generate_texts, score_candidates

    seen = split_captions(paths["pretrain_train"]) | split_captions(paths["qa_train"])
    items = qa_items(n, exclude=seen)
    prompts = [encode_prompt(tok, f"{q.context} {q.question}", chat=True) for q in items]
    lls = score_candidates(model, prompts, [[tok.encode(c) for c in q.candidates] for q in items])
    ranked = [q.candidates[int(np.argmax(ll))] for q, ll in zip(items, lls)]
    greedy = [t.strip() + "." for t in generate_texts(model, tok, prompts, max_new_tokens=12, stop=["."])]
    right = np.array([r == q.answer for r, q in zip(ranked, items)])
    accuracy = float(right.mean())
    exact = float(np.mean([g == q.answer for g, q in zip(greedy, items)]))
    chance = float(np.mean([1 / len(q.candidates) for q in items]))
    print(f"questions about {len(items)} held-out scenes (colour, shape, background, relation):")
    for q, r, g in list(zip(items, ranked, greedy))[:6]:
        print(f"  {q.context} {q.question}\n    ranked: {r:<26} greedy: {g:<26} answer: {q.answer}")
    by_kind = {}
    for kind in QA_KINDS:
        mask = np.array([q.kind == kind for q in items])
        if mask.any():
            kind_chance = float(np.mean([1 / len(q.candidates) for q, m in zip(items, mask) if m]))
            by_kind[kind] = {"n": int(mask.sum()), "accuracy": float(right[mask].mean()), "chance": kind_chance}
    print("  by kind: " + ", ".join(f"{k} {v['accuracy']:.0%} of {v['n']} (chance {v['chance']:.0%})"
                                    for k, v in by_kind.items()))
    print(f"\nanswer accuracy {accuracy:.0%} (log-likelihood ranking of the candidate answers; "
          f"chance {chance:.0%}); greedy exact match {exact:.0%}")
    return {"accuracy": accuracy, "exact_match": exact, "chance": chance, "by_kind": by_kind}


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

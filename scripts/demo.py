#!/usr/bin/env python
"""The whole thing in one command: train the tiny model on the demo data, checkpoint it,
generate from it, and show what it learned.

    python scripts/demo.py [--workdir workdirs/demo] [--steps 200]

The demo data are synthetic scenes of coloured shapes with captions ("a blue circle left of a
yellow square on a black background."); the tiny model (8+8 layers, width 64) learns their
language in a couple of hundred CPU steps. Held-out captions are cut in half and the model
completes them ([S2S] prefix-LM mode of its UL2 pretraining). Rerunning resumes or, when the run is
complete, goes straight to generation.
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
    p.add_argument("--examples", type=int, default=4)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import t5gemma2_jax as tg
    from t5gemma2_jax.data import demo_paths, load_tokenizer
    from t5gemma2_jax.train import load_config, load_export, read_metrics, train

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"train.steps={a.steps}", f"train.checkpoint_every={a.steps}", f"train.eval_every={a.steps}"])
    print(f"training the tiny model for {a.steps} steps on the demo data -> {a.workdir}")
    train(cfg, a.workdir)
    rows = read_metrics(a.workdir)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    print(f"\ntrain loss {losses[0][1]:.2f} (step {losses[0][0]}) -> {losses[-1][1]:.2f} (step {losses[-1][0]})"
          + (f"; held-out loss {evals[-1][1]:.2f}" if evals else ""))

    model = load_export(Path(a.workdir) / "export")
    tok = load_tokenizer(cfg.data)
    s = tok.special
    captions = []
    with open(demo_paths("pretrain")[1]) as f:
        for line in f:
            text = json.loads(line)["text"].replace("<start_of_image>", "").strip()
            if text and not text.startswith("<") and len(text.split()) >= 6:
                captions.append(text)
            if len(captions) == a.examples:
                break
    prompts = [" ".join(c.split()[: len(c.split()) // 2]) for c in captions]
    rows_ = [np.concatenate([[s.bos, s.modes["[S2S]"]], tok.encode(q)]) for q in prompts]
    ids = np.zeros((len(rows_), max(map(len, rows_))), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows_):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    out = np.asarray(tg.generate(model, ids, mask, max_new_tokens=32))
    print("\nheld-out captions, first half given, the model writes the rest:")
    completions = []
    for q, c, o in zip(prompts, captions, out):
        text = tok.decode([int(t) for t in o if t not in (s.eos, s.pad)])
        completions.append(text)
        print(f"  prompt : {q}\n  model  : {text}\n  actual : {c[len(q):].strip()}\n")
    return {"first_loss": losses[0][1], "last_loss": losses[-1][1], "completions": completions}


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

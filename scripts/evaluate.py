#!/usr/bin/env python
"""Evaluate a checkpoint on a file: loss and perplexity, generation metrics, multiple choice.

    # teacher-forced loss / perplexity (pretraining text: also per UL2 task; SFT conversations)
    python scripts/evaluate.py --checkpoint workdirs/demo --data heldout.jsonl --out results.json
    # plus generation metrics: exact match, ROUGE-L, BLEU, chrF (SFT: the last model turn is the
    # reference), every prediction in predictions.jsonl
    python scripts/evaluate.py --checkpoint workdirs/sft --data heldout.jsonl --generate \
        --out results.json --predictions predictions.jsonl
    # multiple choice ({"prompt", "choices", "answer"} records): accuracy by log-likelihood
    python scripts/evaluate.py --checkpoint workdirs/sft --data choices.jsonl --chat
    # image+question records (SFT records with images, "answers": every accepted answer) scored
    # with the benchmarks' metrics: ANLS (DocVQA), VQA accuracy (TextVQA, VQAv2), relaxed
    # accuracy (ChartQA), CIDEr (captions)
    python scripts/evaluate.py --checkpoint workdirs/vqa --data textvqa.jsonl --generate \
        --metrics vqa_accuracy,anls,exact_match --out results.json

--checkpoint takes what generate.py takes: a training work directory (its newest complete step, also
of a run stopped early or without an export), a step directory, a params export, a Hugging Face
directory, a LoRA run. The results are printed as JSON and written to --out.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import json
import sys


def main(argv=None) -> int:
    from t5gemma2_jax import cli

    return cli.run(lambda: run(argv))


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="JSONL or ArrayRecord: {'text'}, {'messages'} or "
                   "{'prompt', 'choices', 'answer'} records")
    p.add_argument("--out", help="results JSON file")
    p.add_argument("--predictions", help="per-example JSONL (generation or choices)")
    p.add_argument("--generate", action="store_true", help="also generation metrics")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the training run used)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--attention-backend", help="replace the attention backend the checkpoint was trained with (auto, dense, blockwise, splash, cudnn)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--encoder-length", type=int)
    p.add_argument("--decoder-length", type=int)
    p.add_argument("--max-examples", type=int, help="at most this many generated-for examples / choice records")
    p.add_argument("--max-batches", type=int, help="at most this many loss batches")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--method", default="greedy", choices=("greedy", "beam"))
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="choice prompts in the chat template")
    p.add_argument("--mode", help="choice prompts after this UL2 mode token, e.g. [S2S]")
    p.add_argument("--metrics", help="comma-separated generation metrics (default: exact_match,rouge_l,bleu,chrf; "
                   "also anls, vqa_accuracy, relaxed_accuracy, cider)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from t5gemma2_jax.configlib import ConfigError
    from t5gemma2_jax.evaluation.run import EvalOptions, evaluate

    for name in ("batch_size", "encoder_length", "decoder_length", "max_examples", "max_batches", "max_new_tokens"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    options = EvalOptions(generate=a.generate, max_examples=a.max_examples, max_batches=a.max_batches,
                          batch_size=a.batch_size, encoder_length=a.encoder_length, decoder_length=a.decoder_length,
                          max_new_tokens=a.max_new_tokens, method=a.method, num_beams=a.num_beams,
                          stop=tuple(a.stop), chat=a.chat, mode=a.mode, progress=not a.no_progress,
                          **({"metrics": tuple(m.strip() for m in a.metrics.split(",") if m.strip())}
                             if a.metrics is not None else {}))
    results = evaluate(a.checkpoint, a.data, tokenizer=a.tokenizer, dtype=a.dtype, options=options, out=a.out,
                       predictions=a.predictions, attention_backend=a.attention_backend)
    shown = {k: v for k, v in results.items() if k not in ("config", "skipped_places")}
    print(json.dumps(shown, indent=1, default=str))
    return results


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Throughput of the data pipeline on the demo dataset (examples/s, tokens/s, packing density).

    python scripts/benchmark_data.py                      # the standard table (docs/benchmarks.md)
    python scripts/benchmark_data.py --batches 20 --only pretrain-text

Each case builds a fresh training pipeline, discards the first batch (worker start-up, caches),
then times `--batches` batches. tokens/s counts non-padding encoder + decoder tokens; density is
the share of non-padding positions in the encoder / decoder rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5gemma2_jax.data import DataConfig, make_pipeline  # noqa: E402

COMMON = dict(encoder_length=512, decoder_length=256, batch_size=16, packing_bins=16)
CASES = {  # name -> DataConfig overrides
    "pretrain-text": dict(kind="pretrain", max_images_per_row=0),
    "pretrain-img32": dict(kind="pretrain", max_images_per_row=4, image_size=32, mm_tokens_per_image=16),
    "pretrain-img224": dict(kind="pretrain", max_images_per_row=4, image_size=224, mm_tokens_per_image=64),
    # 896 px (the released models): 262 encoder tokens per image, so a longer encoder.
    "pretrain-img896": dict(kind="pretrain", max_images_per_row=3, image_size=896, mm_tokens_per_image=256,
                            encoder_length=1024),
    "sft-img32": dict(kind="sft", max_images_per_row=4, image_size=32, mm_tokens_per_image=16),
    "sft-img896": dict(kind="sft", max_images_per_row=3, image_size=896, mm_tokens_per_image=256,
                       encoder_length=1024),
}


def run_case(name: str, workers: int, batches: int) -> dict:
    cfg = DataConfig(**{**COMMON, **CASES[name]}, num_workers=workers)
    with make_pipeline(cfg, "train") as pipe:
        t0 = time.perf_counter()
        next(pipe)
        first = time.perf_counter() - t0
        start_stats = pipe.stats()
        enc_tok = dec_tok = 0
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(pipe)
            enc_tok += int((b["encoder_segment_ids"] > 0).sum())
            dec_tok += int((b["decoder_segment_ids"] > 0).sum())
        dt = time.perf_counter() - t0
        examples = pipe.stats()["examples"] - start_stats["examples"]
    rows = batches * cfg.batch_size
    return dict(case=name, workers=workers, first_batch_s=first, seconds=dt,
                examples_per_s=examples / dt, tokens_per_s=(enc_tok + dec_tok) / dt,
                rows_per_s=rows / dt, enc_density=enc_tok / (rows * cfg.encoder_length),
                dec_density=dec_tok / (rows * cfg.decoder_length))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=30, help="timed batches per case")
    p.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--workers", nargs="*", type=int, default=[0, 1, 2])
    args = p.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; batch {COMMON['batch_size']} x "
          f"(encoder {COMMON['encoder_length']}, decoder {COMMON['decoder_length']}), "
          f"{args.batches} timed batches per case")
    print("| case | encoder len | images/row | workers | examples/s | tokens/s | rows/s | "
          "enc / dec density | first batch s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only:
        for w in args.workers:
            r = run_case(name, w, args.batches)
            c = {**COMMON, **CASES[name]}
            print(f"| {r['case']} | {c['encoder_length']} | {c['max_images_per_row']} | {w} | "
                  f"{r['examples_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{r['rows_per_s']:.1f} | {r['enc_density']:.2f} / {r['dec_density']:.2f} | "
                  f"{r['first_batch_s']:.1f} |", flush=True)


if __name__ == "__main__":  # required: Grain worker processes re-import the main module
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

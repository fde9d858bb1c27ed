#!/usr/bin/env python
"""Compare variants: several results files of scripts/evaluate.py as one markdown table and one plot.

    python scripts/evaluate.py --checkpoint runs/merged --data heldout.jsonl --out merged.json
    python scripts/evaluate.py --checkpoint runs/separate --data heldout.jsonl --out separate.json
    python scripts/compare.py merged.json separate.json --out compare.md --plot compare.png
    # several benchmarks per variant: every file of one checkpoint goes into its column
    python scripts/compare.py a_textvqa.json a_docvqa.json b_textvqa.json b_docvqa.json \
        --names A,B --metrics vqa_accuracy,anls --out compare.md --plot compare.png

The table has a row per metric and a column per variant (the checkpoint's directory name unless
--names says otherwise), the best of each row in bold; it is printed and written to --out. The
plot has a panel per metric with a bar per variant. A missing or malformed file, or a metric no
file has, exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULTS_JSON", help="files written by evaluate.py --out")
    p.add_argument("--names", help="comma-separated labels of the checkpoints, in order of first appearance")
    p.add_argument("--metrics", help="comma-separated metrics to show, in this order (default: every score)")
    p.add_argument("--out", type=Path, help="the markdown file to write")
    p.add_argument("--plot", type=Path, help="the PNG to write")
    a = p.parse_args(argv)

    from t5gemma2_jax.evaluation.compare import compare, markdown_table, plot_comparison

    def split(text):
        return None if text is None else [s.strip() for s in text.split(",") if s.strip()]

    variants, rows, values = compare(a.results, names=split(a.names), metrics=split(a.metrics))
    table = markdown_table(variants, rows, values)
    print(table, end="")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table)
    if a.plot is not None:
        print(f"wrote {plot_comparison(variants, rows, values, a.plot)}")
    return table


def main(argv=None) -> int:
    from t5gemma2_jax import cli

    return cli.run(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

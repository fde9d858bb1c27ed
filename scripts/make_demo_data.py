#!/usr/bin/env python
"""Write the synthetic demo dataset (coloured shapes, captions, Q/A) deterministically.

    python scripts/make_demo_data.py --out data/demo                 # images inline (base64)
    python scripts/make_demo_data.py --out /tmp/demo --image-files   # PNG files, relative paths

Writes pretrain_{train,eval}.jsonl and sft_{train,eval}.jsonl (2000/200 records each at
--scale 1) and qa_train.jsonl (4000 chat records, two questions per scene, for `make demo`). The
trainer uses the same data, generated into its cache, when data.train is unset.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5gemma2_jax.data.demo import write_demo_dataset  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-files", action="store_true",
                   help="write PNG files next to the JSONL instead of inline base64")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of records")
    args = p.parse_args(argv)
    paths = write_demo_dataset(args.out, image_files=args.image_files, scale=args.scale)
    for name, path in paths.items():
        with open(path, "rb") as f:
            n = sum(1 for _ in f)
        print(f"{name}: {path} ({n} records, {os.path.getsize(path) / 1e6:.2f} MB)")


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

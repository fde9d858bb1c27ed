#!/usr/bin/env python
"""Train every config in configs/ablations/ on the demo data and write the comparison table.

    python scripts/run_ablations.py [--workdir workdirs/ablations] [--steps 200] [--doc docs/ablations.md]

Each variant trains from the same seed and data order; the table (final train loss as the mean of
the last 5 logged steps, held-out loss at the end, text parameters, median step time) replaces the
block between the `ablation-results` markers in the doc. Reruns resume finished work directories.
"""

from __future__ import annotations

import sys

import argparse
import logging
import os
import platform
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- ablation-results:begin -->", "<!-- ablation-results:end -->"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "workdirs" / "ablations"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--doc", default=str(ROOT / "docs" / "ablations.md"))
    p.add_argument("--only", nargs="*", help="config names to run (default: all)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import t5gemma2_jax as tg
    from t5gemma2_jax import storage
    from t5gemma2_jax.train import load_config, read_metrics, train

    rows = []
    for path in sorted((ROOT / "configs" / "ablations").glob("*.yaml")):
        if a.only and path.stem not in a.only:
            continue
        overrides = [f"train.steps={a.steps}", f"train.checkpoint_every={a.steps}", f"train.eval_every={a.steps}"]
        cfg = load_config(path, overrides)
        workdir = storage.join(a.workdir, path.stem)
        print(f"{path.stem}: training {a.steps} steps -> {workdir}", flush=True)
        train(cfg, workdir)
        metrics = read_metrics(workdir)
        losses = [r["loss"] for r in metrics if "loss" in r]
        evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
        times = [r["step_time"] for r in metrics if "step_time" in r]
        params = tg.count_params(cfg.model_config())
        rows.append((path.stem, statistics.mean(losses[-5:]), evals[-1] if evals else float("nan"),
                     params["text"], statistics.median(times)))
    table = ["| variant | train loss (last 5 logs) | held-out loss | text params | step time |",
             "|---|---|---|---|---|"]
    table += [f"| `{n}` | {l:.3f} | {e:.3f} | {pp / 1e6:.3f}M | {t * 1e3:.0f} ms |" for n, l, e, pp, t in rows]
    block = "\n".join([BEGIN, f"`.venv/bin/python scripts/run_ablations.py --steps {a.steps}` on a {os.cpu_count()}-core "
                       f"{platform.machine()} CPU, same seed and data order for every variant:", "",
                       *table, END])
    doc = Path(a.doc)
    text = doc.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Training the variants on the demo data\n\n" + block + "\n"
    doc.write_text(text)
    print("\n".join(table))
    return "\n".join(table)


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

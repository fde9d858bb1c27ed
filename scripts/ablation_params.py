#!/usr/bin/env python
"""Parameter-count effect of each architecture ablation on the released sizes (no allocation).

    python scripts/ablation_params.py --presets 270m-270m 4b-4b

Counts text parameters (embeddings + both towers; the vision tower and projector are the same in
every variant). "Saving" is the reduction the released choice gives over the variant.
"""

from __future__ import annotations

import sys

import argparse

import t5gemma2_jax as tg

VARIANTS = (
    ("released: merged attention, tied embeddings", {}),
    ("untied embeddings (encoder input, decoder input, output head)", dict(embeddings="untied")),
    ("separate cross-attention sublayers (T5Gemma v1-style)", dict(cross_attention="separate")),
    ("separate cross-attention + untied embeddings", dict(cross_attention="separate", embeddings="untied")),
    ("cross-attention only in global layers (merged)", dict(cross_attention="global_only")),
)


def table(presets) -> str:
    lines = ["| variant | " + " | ".join(presets) + " |", "|---|" + "---|" * len(presets)]
    base = {p: tg.count_params(tg.preset(p, with_vision=False))["text"] for p in presets}
    for name, kw in VARIANTS:
        cells = []
        for p in presets:
            n = tg.count_params(tg.preset(p, with_vision=False, **kw))["text"]
            saving = "" if n == base[p] else f" (released saves {100 * (n - base[p]) / n:.1f}%)"
            cells.append(f"{n / 1e6:,.1f}M{saving}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["270m-270m", "4b-4b"])
    print(table(p.parse_args(argv).presets))


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

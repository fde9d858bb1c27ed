#!/usr/bin/env python
"""Build T5Gemma 2 from a Hugging Face Gemma 3 checkpoint and write it out.

    python scripts/adapt_gemma3.py --gemma3 gemma-3-270m --out t5g2-270m
    python scripts/adapt_gemma3.py --gemma3 gemma-3-270m --out t5g2-270m-release --rope-global-factor 8 \
        --max-position-embeddings 131072      # the released T5Gemma 2's RoPE and length
    python scripts/adapt_gemma3.py --gemma3 gemma-3-4b-pt --out t5g2-4b --format orbax --dtype bfloat16

--format hf (default) writes a directory `T5Gemma2ForConditionalGeneration.from_pretrained` and
`t5gemma2_jax.load_hf` read; --format orbax writes `model_config.json` + `params/` (Orbax, one
entry per parameter under its dotted NNX path: the params export of `t5gemma2_jax.checkpoints.export`),
which `t5gemma2_jax.load_export` and the trainer's `train.init_from` read. Both also get `adaptation.json`: what was copied, dropped and
initialised. See docs/adaptation.md.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (flag, config field, type, help)
_OVERRIDES = [
    ("--vocab-size", "vocab_size", int, "rows kept from the source table (default min(source, 262144))"),
    ("--image-token-id", "image_token_id", int, "image soft token (default 256001 when it fits)"),
    ("--boi-token-id", "boi_token_id", int, "<start_of_image> (default the source's, 255999)"),
    ("--eoi-token-id", "eoi_token_id", int, "<end_of_image> (default the source's, 256000)"),
    ("--mm-tokens-per-image", "mm_tokens_per_image", int, "image tokens per image (default the source's or 256)"),
    ("--rope-global-factor", "rope_global_factor", float, "linear RoPE factor of global layers (release: 8)"),
    ("--rope-global-theta", "rope_global_theta", float, "RoPE base of global layers"),
    ("--rope-local-factor", "rope_local_factor", float, "linear RoPE factor of local layers"),
    ("--rope-local-theta", "rope_local_theta", float, "RoPE base of local layers"),
    ("--sliding-window", "sliding_window", int, "window of local layers (W keys)"),
    ("--max-position-embeddings", "max_position_embeddings", int,
     "longest sequence per tower (default the source's: 32768 for 270M/1B, 131072 for 4B+; release: 131072)"),
]


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def main(argv=None) -> int:
    """The command line: exit status 0, or `error: ...` and 2 for a missing or malformed source."""
    from t5gemma2_jax import cli

    return cli.run(lambda: adapt(argv))


def adapt(argv=None):
    """Run the adaptation; returns the adapted model (handy from Python and in tests)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gemma3", required=True, help="Hugging Face Gemma 3 checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf", help="output format (default hf)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype written (default float32)")
    p.add_argument("--text-only", action="store_true", help="no vision tower (the source's is skipped)")
    p.add_argument("--eoi-init", choices=("source", "zeros"), default="source",
                   help="eoi_embedding: the source's scaled <end_of_image> row (default) or zeros")
    p.add_argument("--seed", type=int, default=0, help="seed for what the source lacks (vision tower, new rows)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="hf format: shard size (e.g. 2GB)")
    for flag, _, typ, help_ in _OVERRIDES:
        p.add_argument(flag, type=typ, default=None, help=help_)
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from t5gemma2_jax import storage
    from t5gemma2_jax.checkpoints import adapt_gemma3, flat_params, save_export, save_hf

    overrides = {field: getattr(args, field) for _, field, _, _ in _OVERRIDES if getattr(args, field) is not None}
    model, info = adapt_gemma3(args.gemma3, dtype=jnp.dtype(args.dtype), text_only=args.text_only,
                               eoi_init=args.eoi_init, rngs=args.seed, return_info=True, **overrides)
    out = storage.as_path(args.out)
    if args.format == "hf":
        save_hf(model, out, max_shard_size=args.max_shard_size)
    else:
        save_export(out, model.config, flat_params(model))
    info["format"] = args.format
    info["overrides"] = overrides
    storage.write_text(out / "adaptation.json", json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("vocab", "tokens", "eoi_embedding", "vision", "rope",
                                           "max_position_embeddings")}, indent=1))
    print(f"wrote {args.format} checkpoint to {out}")
    return model


if __name__ == "__main__":
    sys.exit(main())

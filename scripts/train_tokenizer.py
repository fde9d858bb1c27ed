#!/usr/bin/env python
"""Train a small SentencePiece model with Gemma's special-id layout (for experiments and tests).

    python scripts/train_tokenizer.py --output tiny.model                 # the default tiny corpus
    python scripts/train_tokenizer.py --input corpus.txt data.jsonl --output my.model --vocab-size 1024

Layout: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <start_of_image>, 5 <end_of_image>,
6 <image_soft_token>, 7 <start_of_turn>, 8 <end_of_turn>, 9 [NLU], 10 [NLG], 11 [S2S],
12.. <unused0>.. (UL2 sentinels), then byte pieces and BPE merges. Inputs are plain text (one
sentence per line) or JSONL (the `text` and message `content` fields are used). Training is
single-threaded and deterministic. Without --input this reproduces the cached tiny tokenizer that
`DataConfig(tokenizer=None)` uses.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5gemma2_jax.data.cache import atomic_write_bytes  # noqa: E402
from t5gemma2_jax.data.tiny_tokenizer import (TINY_NUM_SENTINELS, TINY_VOCAB_SIZE,  # noqa: E402
                                              corpus_from_files, default_corpus, train_tokenizer)
from t5gemma2_jax.data.tokenizer import Tokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="*", default=[], help="text or JSONL files (default: tiny corpus)")
    p.add_argument("--output", required=True, help="path of the .model file to write")
    p.add_argument("--vocab-size", type=int, default=TINY_VOCAB_SIZE)
    p.add_argument("--num-sentinels", type=int, default=TINY_NUM_SENTINELS)
    args = p.parse_args(argv)

    lines = corpus_from_files(args.input) if args.input else default_corpus()
    if not lines:
        p.error("the input files contain no text")
    try:
        model = train_tokenizer(lines, vocab_size=args.vocab_size, num_sentinels=args.num_sentinels)
    except RuntimeError as e:  # typically: not enough distinct text for the vocabulary size
        p.error(f"SentencePiece training failed: {e}\n(use a larger, more varied corpus or a "
                "smaller --vocab-size)")
    atomic_write_bytes(args.output, model)
    tok = Tokenizer(args.output, num_sentinels=args.num_sentinels)
    s = tok.special
    print(f"wrote {args.output}: {tok.vocab_size} pieces from {len(lines)} lines")
    print(f"  pad/eos/bos/unk {s.pad}/{s.eos}/{s.bos}/{s.unk}  boi/eoi/image {s.boi}/{s.eoi}/{s.image}"
          f"  turns {s.start_of_turn}/{s.end_of_turn}  modes {dict(s.modes)}"
          f"  sentinels {s.sentinels[0]}..{s.sentinels[-1]}")


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))

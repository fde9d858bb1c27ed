"""Training small SentencePiece models with Gemma's id layout (for experiments and tests).

The tiny model (512 pieces, matching the 'tiny' model preset's vocab_size) has:
  0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <start_of_image>, 5 <end_of_image>,
  6 <image_soft_token>, 7 <start_of_turn>, 8 <end_of_turn>, 9 [NLU], 10 [NLG], 11 [S2S],
  12.. <unused0>..<unused{N-1}> (UL2 sentinels), then byte pieces <0x00>..<0xFF>, then BPE.
Like Gemma: BPE, byte fallback, digits split, no text normalisation, no dummy prefix.

`tiny_tokenizer_path()` trains it deterministically on first use (single-threaded BPE on a
fixed corpus, a fraction of a second) and caches the file under a name that hashes corpus and options.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

from t5gemma2_jax.data.cache import atomic_write_bytes, cache_dir

TINY_VOCAB_SIZE = 512
TINY_NUM_SENTINELS = 64

# Generic English so that the tiny tokenizer also handles text beyond the demo vocabulary.
_GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns simple patterns quickly.
Encoder-decoder models read the whole input with bidirectional attention and write the output
one token at a time. The decoder attends to its own past tokens and to every encoder token.
Pretraining corrupts spans of text and asks the model to reconstruct them; a prefix language
model continues a text from its beginning. Images are turned into soft tokens by a vision tower.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 are split into digits. Questions end with a
question mark? Answers are short. Lists, commas; colons: and (parentheses) appear in text too.
User: what is in the picture? Model: a red circle above a blue square.
The weather today is sunny with a light breeze, and the river flows slowly through the town.
Data pipelines must be correct, resumable and fast; bad records are counted and skipped.
"""


def special_symbols(num_sentinels: int = TINY_NUM_SENTINELS) -> list[str]:
    """User-defined symbols in id order, starting at id 4."""
    return (["<start_of_image>", "<end_of_image>", "<image_soft_token>",
             "<start_of_turn>", "<end_of_turn>", "[NLU]", "[NLG]", "[S2S]"]
            + [f"<unused{i}>" for i in range(num_sentinels)])


def train_tokenizer(lines: Iterable[str], *, vocab_size: int = TINY_VOCAB_SIZE,
                    num_sentinels: int = TINY_NUM_SENTINELS) -> bytes:
    """Trains a BPE SentencePiece model with the Gemma id layout; returns the .model bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=special_symbols(num_sentinels),
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        hard_vocab_limit=True, minloglevel=2)
    return model.getvalue()


def default_corpus() -> list[str]:
    from t5gemma2_jax.data.demo import text_corpus

    return [line for line in _GENERIC_TEXT.splitlines() if line] + text_corpus()


def tiny_tokenizer_path(*, vocab_size: int = TINY_VOCAB_SIZE,
                        num_sentinels: int = TINY_NUM_SENTINELS) -> str:
    """Path of the cached tiny tokenizer, training it first if needed."""
    lines = default_corpus()
    key = hashlib.sha256(json.dumps(
        {"lines": lines, "vocab": vocab_size, "sentinels": num_sentinels, "v": 1}).encode()
    ).hexdigest()[:12]
    path = cache_dir() / f"tiny_tokenizer_{vocab_size}_{key}.model"
    if not path.exists():
        atomic_write_bytes(path, train_tokenizer(lines, vocab_size=vocab_size,
                                                 num_sentinels=num_sentinels))
    return str(path)


def corpus_from_files(paths: Sequence[str | Path]) -> list[str]:
    """Lines for training: plain text files, or JSONL (`text` and message `content` fields)."""
    lines: list[str] = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for raw in f:
                raw = raw.rstrip("\n")
                if not raw.strip():
                    continue
                if str(p).endswith(".jsonl"):
                    try:
                        rec = json.loads(raw)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(rec, dict):
                        if isinstance(rec.get("text"), str):
                            lines.append(rec["text"].replace("<start_of_image>", ""))
                        for m in rec.get("messages") or []:
                            if isinstance(m, dict) and isinstance(m.get("content"), str):
                                lines.append(m["content"].replace("<start_of_image>", ""))
                else:
                    lines.append(raw)
    return lines

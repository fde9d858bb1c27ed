"""Held-out examples one by one (not packed), laid out exactly as training lays them out: the
prompts and references of generation metrics, and the records of an evaluation file.

SFT conversations give their last model turn as the reference and everything before it (with
the chat template and images) as the prompt; pretraining text gives a prefix-LM split (the
`[S2S]` denoiser: the encoder sees a prefix, the reference is the rest)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data import counters
from t5gemma2_jax.data.config import DataConfig, DenoiserSpec
from t5gemma2_jax.data.counters import Skip
from t5gemma2_jax.data.elements import Example
from t5gemma2_jax.data.images import expand
from t5gemma2_jax.data.records import BadRecord, ParseRecord, decode_record
from t5gemma2_jax.data.sft import ChatTemplate
from t5gemma2_jax.data.sources import Unreadable, open_source
from t5gemma2_jax.data.tasks import PretrainExamples, SftExamples
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.data.ul2 import Denoiser

RECORD_KINDS = ("pretrain", "sft", "choice", "ruler")


@dataclasses.dataclass
class Skipped:
    """Records (or examples) left out, by reason, and the first few places with their message."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    places: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str, place: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if len(self.places) < 20:
            self.places.append(f"{place}: {reason}")

    def add_skip(self, skip: Skip) -> None:
        for name, n in counters.as_dict(skip.counts).items():
            if name.startswith("skipped/") and n:
                self.add(name.split("/", 1)[1], f"{skip.origin} ({skip.message})" if skip.message else skip.origin, n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def record_kind(path: str) -> str:
    """"sft" ({"messages"}), "choice" ({"prompt", "choices", "answer"}), "ruler" (a long-context task
    record of `evaluation.ruler`: {"input", "answers", ...}) or "pretrain" ({"text"}), from the first
    record that parses as a JSON object; ConfigError when none does."""
    source = open_source(path)
    for i in range(min(len(source), 1000)):
        payload = source[i].payload
        if isinstance(payload, Unreadable):
            continue
        try:
            rec = decode_record(payload)
        except BadRecord:
            continue
        for key, kind in (("messages", "sft"), ("choices", "choice"), ("answers", "ruler"), ("text", "pretrain")):
            if key in rec:
                return kind
    raise ConfigError(f"--data {path}: no record is a JSON object with 'text', 'messages', 'choices' or 'answers' "
                      f"({len(source)} records)")


def prefix_lm(cfg: DataConfig) -> DenoiserSpec:
    """The prefix-LM denoiser of `cfg` (its `[S2S]` task), or the default one."""
    return next((d for d in cfg.ul2_denoisers if d.kind == "prefix"),
                DenoiserSpec(name="S", kind="prefix", weight=1.0, mode="[S2S]"))


def iter_examples(cfg: DataConfig, tok: Tokenizer, path: str, skipped: Skipped) -> Iterator[Example]:
    """Each record's example (SFT: its last model turn; text: a prefix-LM split), in file order;
    records that cannot be used are counted in `skipped`."""
    for _, ex in iter_indexed_examples(cfg, tok, path, skipped):
        yield ex


def iter_indexed_examples(cfg: DataConfig, tok: Tokenizer, path: str,
                          skipped: Skipped) -> Iterator[tuple[int, Example]]:
    """`iter_examples` with the index of the record each example comes from."""
    source = open_source(path, cfg.image_root)
    parser = ParseRecord(kind=cfg.kind, tokenizer=tok, names=source.names, base_dirs=source.base_dirs,
                         image_size=cfg.image_size, mm_tokens_per_image=cfg.mm_tokens_per_image,
                         max_images=cfg.max_images_per_row, unknown_fields=cfg.unknown_fields,
                         process_index=0, process_count=1)
    if cfg.kind == "sft":
        task = SftExamples(ChatTemplate(tok), encoder_length=cfg.encoder_length, decoder_length=cfg.decoder_length,
                           max_images=cfg.max_images_per_row, turns="last", truncation=cfg.sft_truncation,
                           image_size=cfg.image_size)
    else:
        spec = dataclasses.replace(prefix_lm(cfg), weight=1.0)
        denoiser = Denoiser(spec, tok.special, encoder_length=cfg.encoder_length, decoder_length=cfg.decoder_length,
                            image_block=tok.image_block(cfg.mm_tokens_per_image), mode_tokens=cfg.ul2_mode_tokens)
        task = PretrainExamples([denoiser], [1.0], seed=cfg.seed, task_index=0, long_documents="skip")
    for i in range(len(source)):
        for ex in task.flat_map(parser.map_with_index(i, source[i])):
            if isinstance(ex, Skip):
                skipped.add_skip(ex)
            else:
                yield i, ex


def record_answers(source, index: int) -> list[str] | None:
    """The `answers` of record `index` of an opened source (`data.sources.open_source`): every
    accepted answer of an image-question record (VQA's ten annotators, DocVQA's variants), None
    when it has none; ValueError when it is not a non-empty list of strings."""
    rec = decode_record(source[index].payload)
    answers = rec.get("answers")
    if answers is None:
        return None
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise ValueError(f"'answers' must be a non-empty list of strings, got {answers!r}")
    return answers


def prompt_ids(ex: Example, bos: int) -> np.ndarray:
    """The encoder input of one example as generation takes it (bos first, as packing puts it)."""
    ids = np.asarray(ex.encoder_ids, np.int32)
    return ids if len(ids) and ids[0] == bos else np.concatenate([[bos], ids]).astype(np.int32)


def reference_text(ex: Example, tok: Tokenizer) -> str:
    """The trained-on target tokens, decoded, without eos / end of turn."""
    s = tok.special
    ids = [int(t) for t, w in zip(ex.targets, ex.loss_weights) if w > 0 and t not in (s.eos, s.pad, s.end_of_turn)]
    return tok.decode(ids).strip()


def example_pixels(examples: list[Example], max_images: int, image_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`[N, max_images, 3, H, W]` pixels and `[N, max_images]` mask of examples' images (None: no images)."""
    if max_images == 0 or not any(ex.num_images for ex in examples):
        return None
    pixels = np.zeros((len(examples), max_images, 3, image_size, image_size), np.float32)
    mask = np.zeros((len(examples), max_images), bool)
    for i, ex in enumerate(examples):
        if ex.num_images:
            pixels[i, :ex.num_images] = expand(ex.images)
            mask[i, :ex.num_images] = True
    return pixels, mask

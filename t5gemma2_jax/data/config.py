"""`DataConfig`: every knob of the data pipeline, frozen and validated.

The trainer sets fields from dotted command-line overrides (`data.encoder_length=512`), so every
field has a simple type; `with_overrides` reads command-line strings into those types through the
config engine (`t5gemma2_jax.configlib`). Validation errors are `ConfigError`s naming the field
(`data.decoder_length: ...`).

UL2 denoisers are given as a tuple of `DenoiserSpec`, or on a command line as one compact
string (see `parse_denoisers`):

    data.ul2_denoisers="R:3:0.15:0.2,R:8:0.15:0.2,X:3:0.5:0.1,X:8:0.5:0.1,X:64:0.15:0.1,X:64:0.5:0.1,S:0.2"

`R`/`X` entries are span corruption `LETTER:mean_span:corruption_rate:weight` (R uses the
`[NLU]` mode token, X `[NLG]`); `S:weight` is the prefix-LM denoiser (mode `[S2S]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from t5gemma2_jax import configlib
from t5gemma2_jax.configlib import ConfigError

KINDS = ("pretrain", "sft")
DENOISER_KINDS = ("span", "prefix")
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
LONG_DOCUMENT_POLICIES = ("split", "skip")
SFT_TURNS = ("all", "last")
SFT_TRUNCATION = ("drop_turns", "skip")
UNKNOWN_FIELD_POLICIES = ("skip", "ignore")
IMAGE_DENOISERS = ("all", "prefix")


# The data layer's name for the one config error type.
DataConfigError = ConfigError


@dataclass(frozen=True)
class DenoiserSpec:
    """One UL2 denoising task.

    kind="span": T5 span corruption; `noise_density` of the text tokens is replaced by spans of
    mean length `mean_span`, each span by one sentinel in the encoder input; the decoder
    target lists `sentinel_k span_k ...` then eos.
    kind="prefix": prefix LM; the text is split at a uniformly random point (within the
    length limits); the encoder gets the prefix, the decoder the rest + eos.
    `mode` is the paradigm token prepended to the encoder input (after bos).
    """

    name: str
    kind: str = "span"
    mean_span: float = 3.0
    noise_density: float = 0.15
    weight: float = 1.0
    mode: str = "[NLU]"

    def __post_init__(self):
        where = f"data.ul2_denoisers[{self.name}]"
        if not self.name or not isinstance(self.name, str):
            raise DataConfigError(f"{where}.name: must be a non-empty string")
        if self.kind not in DENOISER_KINDS:
            raise DataConfigError(f"{where}.kind: must be one of {DENOISER_KINDS}, got {self.kind!r}")
        if self.kind == "span":
            if not (self.mean_span >= 1.0):
                raise DataConfigError(f"{where}.mean_span: must be >= 1, got {self.mean_span}")
            if not (0.0 < self.noise_density < 1.0):
                raise DataConfigError(
                    f"{where}.noise_density: must be in (0, 1), got {self.noise_density}")
        if not (self.weight >= 0.0 and math.isfinite(self.weight)):
            raise DataConfigError(f"{where}.weight: must be a finite number >= 0, got {self.weight}")
        if self.mode not in MODE_TOKENS:
            raise DataConfigError(f"{where}.mode: must be one of {MODE_TOKENS}, got {self.mode!r}")


# The canonical UL2 mixture (Tay et al. 2022): two R-, four X- and one S-denoiser. The
# T5Gemma 2 mixture is not public (docs/architecture.md); these weights are our choice.
DEFAULT_DENOISERS_SPEC = (
    "R:3:0.15:0.2,R:8:0.15:0.2,X:3:0.5:0.1,X:8:0.5:0.1,X:64:0.15:0.1,X:64:0.5:0.1,S:0.2"
)


def parse_denoisers(value: Any) -> tuple[DenoiserSpec, ...]:
    """Accepts a tuple of `DenoiserSpec`, a list of dicts (YAML), or the compact string."""
    if isinstance(value, str):
        specs = []
        for i, entry in enumerate(e.strip() for e in value.split(",") if e.strip()):
            parts = entry.split(":")
            letter = parts[0].upper()
            try:
                if letter in ("R", "X") and len(parts) == 4:
                    mu, rate, weight = (float(p) for p in parts[1:])
                    specs.append(DenoiserSpec(
                        name=f"{letter}{i}_mu{parts[1]}_r{parts[2]}", kind="span", mean_span=mu,
                        noise_density=rate, weight=weight,
                        mode="[NLU]" if letter == "R" else "[NLG]"))
                elif letter == "S" and len(parts) == 2:
                    specs.append(DenoiserSpec(name=f"S{i}", kind="prefix", weight=float(parts[1]),
                                              mode="[S2S]"))
                else:
                    raise ValueError
            except ValueError as e:
                if isinstance(e, DataConfigError):
                    raise
                raise DataConfigError(
                    f"data.ul2_denoisers: cannot parse entry {entry!r}; expected "
                    "'R:mean_span:rate:weight', 'X:mean_span:rate:weight' or 'S:weight'") from None
        value = specs
    out = []
    for item in value:
        if isinstance(item, DenoiserSpec):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(DenoiserSpec(**item))
        else:
            raise DataConfigError(f"data.ul2_denoisers: entries must be DenoiserSpec or dicts, "
                                  f"got {type(item).__name__}")
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise DataConfigError(f"data.ul2_denoisers: names must be unique, got {names}")
    return tuple(out)


def _parse_overrides(value: Any) -> tuple[tuple[str, int], ...]:
    """Tokenizer id overrides: a mapping, pairs, or 'image=256001,boi=255999'."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        pairs = []
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            key, sep, num = entry.partition("=")
            if not sep:
                raise DataConfigError(
                    f"data.tokenizer_overrides: expected 'name=id' entries, got {entry!r}")
            pairs.append((key.strip(), int(num)))
        return tuple(pairs)
    if isinstance(value, Mapping):
        return tuple((str(k), int(v)) for k, v in value.items())
    return tuple((str(k), int(v)) for k, v in value)


@dataclass(frozen=True)
class DataConfig:
    """Configuration of the data pipeline (the `data.` section of the trainer's config)."""

    # Inputs. `train`/`eval`: a JSONL or ArrayRecord path, a glob, or comma-separated paths.
    # None means the built-in demo dataset (generated deterministically and cached).
    train: str | None = None
    eval: str | None = None
    kind: str = "pretrain"  # "pretrain" (UL2 on {"text", "images"}) or "sft" ({"messages"})
    # Path to a SentencePiece model (a Gemma 3 `tokenizer.model`); None = the tiny 512-piece
    # tokenizer trained on demand (matches the 'tiny' model preset).
    tokenizer: str | None = None
    tokenizer_overrides: tuple[tuple[str, int], ...] = ()  # e.g. "image=256001,boi=255999"
    # Sentinel pool size (reused cyclically when a text needs more). 96 = all of Gemma 3's low
    # <unused3>..<unused98> range (ids 9..104); the tiny tokenizer has 64.
    num_sentinels: int = 96

    # Shapes. `batch_size` is the global batch (rows); each host produces batch_size/process_count.
    encoder_length: int = 256
    decoder_length: int = 128
    batch_size: int = 8

    # Packing: several examples per row; `packing_bins` rows are filled at once (first fit).
    packing: bool = True
    packing_bins: int = 8

    # UL2 (kind="pretrain").
    ul2_denoisers: tuple[DenoiserSpec, ...] = field(
        default_factory=lambda: parse_denoisers(DEFAULT_DENOISERS_SPEC))
    ul2_mode_tokens: bool = True  # prepend [NLU]/[NLG]/[S2S] after bos
    long_documents: str = "split"  # text-only documents too long for a denoiser: split or skip
    image_denoisers: str = "all"  # documents with images: every denoiser, or only the prefix LM ("prefix")

    # SFT (kind="sft").
    sft_turns: str = "all"  # one example per model turn ("all") or only the last model turn
    sft_truncation: str = "drop_turns"  # prompt too long: drop oldest turns, or skip example

    # Images. max_images_per_row=0 disables images (they are dropped and counted).
    max_images_per_row: int = 2
    image_size: int = 32
    mm_tokens_per_image: int = 16
    image_root: str | None = None  # base of relative image paths for non-file sources

    # Robustness.
    unknown_fields: str = "skip"  # a record with an unknown field is skipped, or "ignore"d
    max_bad_fraction: float = 0.05  # skipped / records_seen above this stops the run ...
    bad_fraction_min_records: int = 1000  # ... once at least this many records were seen

    # Execution.
    num_workers: int = 0  # Grain worker processes (decode images, tokenize, pack)
    worker_buffer_size: int = 2  # batches buffered per worker
    shuffle: bool = True  # train split only; eval is read once in file order
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ul2_denoisers", parse_denoisers(self.ul2_denoisers))
        object.__setattr__(self, "tokenizer_overrides", _parse_overrides(self.tokenizer_overrides))
        for name in ("encoder_length", "decoder_length", "batch_size", "packing_bins",
                     "image_size", "mm_tokens_per_image", "num_sentinels", "worker_buffer_size"):
            _require_int(self, name, minimum=1)
        for name in ("max_images_per_row", "num_workers", "bad_fraction_min_records", "seed"):
            _require_int(self, name, minimum=0)
        _require_choice(self, "kind", KINDS)
        _require_choice(self, "long_documents", LONG_DOCUMENT_POLICIES)
        _require_choice(self, "sft_turns", SFT_TURNS)
        _require_choice(self, "sft_truncation", SFT_TRUNCATION)
        _require_choice(self, "unknown_fields", UNKNOWN_FIELD_POLICIES)
        for name in ("packing", "ul2_mode_tokens", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise DataConfigError(f"data.{name}: must be a bool, got {getattr(self, name)!r}")
        if not (0.0 <= self.max_bad_fraction <= 1.0):
            raise DataConfigError(
                f"data.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if self.kind == "pretrain":
            if not self.ul2_denoisers:
                raise DataConfigError("data.ul2_denoisers: at least one denoiser is needed")
            if sum(d.weight for d in self.ul2_denoisers) <= 0:
                raise DataConfigError("data.ul2_denoisers: the weights must not all be 0")
        if self.image_denoisers not in IMAGE_DENOISERS:
            raise DataConfigError(f"data.image_denoisers: must be one of {IMAGE_DENOISERS}, got {self.image_denoisers!r}")
        if self.kind == "pretrain" and self.image_denoisers == "prefix" and not any(
                d.kind == "prefix" and d.weight > 0 for d in self.ul2_denoisers):
            raise DataConfigError("data.image_denoisers: 'prefix' needs a prefix-LM denoiser (S:weight) with a "
                                  "weight > 0 in data.ul2_denoisers")
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image:
            raise DataConfigError(
                f"data.mm_tokens_per_image: must be a perfect square, got {self.mm_tokens_per_image}")
        if self.max_images_per_row > 0:
            need = self.mm_tokens_per_image + 6  # the image block plus bos, mode and "\n\n"s
            if self.encoder_length < need:
                raise DataConfigError(
                    f"data.encoder_length: {self.encoder_length} cannot hold one image "
                    f"({self.mm_tokens_per_image} tokens + markers); raise it or set "
                    "data.max_images_per_row=0")
        if self.decoder_length < 2:
            raise DataConfigError(f"data.decoder_length: must be >= 2, got {self.decoder_length}")

    @property
    def images_enabled(self) -> bool:
        return self.max_images_per_row > 0

    def per_host_batch_size(self, process_count: int) -> int:
        if self.batch_size % process_count:
            raise DataConfigError(
                f"data.batch_size: {self.batch_size} is not divisible by the process count "
                f"{process_count}")
        return self.batch_size // process_count

    def with_overrides(self, overrides: Mapping[str, Any]) -> "DataConfig":
        """A copy with `{"data.encoder_length": "512", ...}` applied (the `data.` prefix is
        optional); string values are read like command-line values."""
        return configlib.with_overrides(self, overrides, "data")


def _require_int(cfg: DataConfig, name: str, minimum: int) -> None:
    configlib.require_int(cfg, "data", name, minimum=minimum)


def _require_choice(cfg: DataConfig, name: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, name)
    configlib.require(value in choices, f"data.{name}", f"must be one of {tuple(choices)}, got {value!r}")

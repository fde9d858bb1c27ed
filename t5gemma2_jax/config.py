"""Typed, frozen, validated configuration of a T5Gemma 2 model.

A `T5Gemma2Config` holds one `TextConfig` per tower, the SigLIP `VisionConfig`, the special token
ids, and the few runtime choices that change the compiled program but not the checkpoint
(`RUNTIME_FIELDS`: dtypes, scanning, remat, attention backend). Every config validates itself on
construction and names the offending field; `from_dict` reads one back through the config engine
(`t5gemma2_jax.configlib`).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass, field

from t5gemma2_jax import configlib
from t5gemma2_jax.configlib import ConfigError, require_int
from t5gemma2_jax.ops import backends
from t5gemma2_jax.ops.scan import REMAT_POLICIES

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

DTYPES = ("float32", "bfloat16", "float16")
# Architecture ablations (the T5Gemma 2 paper's): how the decoder reads the encoder, and tying.
CROSS_ATTENTION = ("merged", "separate", "global_only")
EMBEDDINGS = ("tied", "untied")
# Fields that change how a model runs, not what its parameters are: a checkpoint loads into a
# config that differs from its own only in these.
RUNTIME_FIELDS = ("with_vision", "dtype", "param_dtype", "scan_layers", "remat", "attention_backend",
                  "attention_block_size")
# TextConfig fields that size a tower's parameters (width, MLP, layers, heads): what a model size is.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")

__all__ = ["ConfigError"]  # re-exported: the one error type of every config


def _check(cond: bool, where: str, name: str, msg: str) -> None:
    configlib.require(cond, f"{where}.{name}", msg)


def _positive_int(obj, where: str, *names: str) -> None:
    require_int(obj, where, *names)


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's pattern: every `pattern`-th layer is global, the others local."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


@dataclass(frozen=True)
class TextConfig:
    """One transformer tower (the encoder's text model or the decoder)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    layer_types: tuple[str, ...]
    query_pre_attn_scalar: float = 256.0
    rope_local_theta: float = 10_000.0
    rope_local_factor: float = 1.0
    rope_global_theta: float = 1_000_000.0
    rope_global_factor: float = 8.0
    rms_norm_eps: float = 1e-6
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 131_072

    def __post_init__(self):
        where = type(self).__name__
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        _positive_int(
            self, where, "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "head_dim", "sliding_window", "max_position_embeddings",
        )
        _check(self.num_heads % self.num_kv_heads == 0, where, "num_kv_heads",
               f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
        _check(self.head_dim % 2 == 0, where, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        _check(len(self.layer_types) == self.num_layers, where, "layer_types",
               f"has {len(self.layer_types)} entries but num_layers={self.num_layers}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        _check(not bad, where, "layer_types", f"unknown layer types {bad}; expected {LAYER_TYPES}")
        for name in ("query_pre_attn_scalar", "rope_local_theta", "rope_global_theta",
                     "rope_local_factor", "rope_global_factor", "rms_norm_eps"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                   and math.isfinite(value), where, name, f"must be a positive number, got {value!r}")
        if self.final_logit_softcap is not None:
            _check(isinstance(self.final_logit_softcap, (int, float)) and self.final_logit_softcap > 0,
                   where, "final_logit_softcap", f"must be None or > 0, got {self.final_logit_softcap!r}")

    @property
    def num_global_layers(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    def replace(self, **kw) -> "TextConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (no pooling head) feeding the encoder through the projector."""

    image_size: int = 896
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        where = type(self).__name__
        _positive_int(self, where, "image_size", "patch_size", "num_channels", "hidden_size",
                      "intermediate_size", "num_layers", "num_heads")
        _check(self.image_size % self.patch_size == 0, where, "patch_size",
               f"{self.patch_size} must divide image_size={self.image_size}")
        _check(self.hidden_size % self.num_heads == 0, where, "num_heads",
               f"{self.num_heads} must divide hidden_size={self.hidden_size}")
        _check(self.layer_norm_eps > 0, where, "layer_norm_eps", "must be > 0")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def replace(self, **kw) -> "VisionConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class T5Gemma2Config:
    encoder: TextConfig
    decoder: TextConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    mm_tokens_per_image: int = 256
    image_token_id: int = 256_001
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    # Ablations. Released checkpoints: merged attention, one tied table.
    #   cross_attention: "merged" (T5Gemma 2), "separate" (own cross-attention sublayer per
    #   decoder layer, T5Gemma v1-style), "global_only" (merged on global layers, none on local).
    #   embeddings: "tied" (encoder input = decoder input = output head) or "untied" (three tables).
    cross_attention: str = "merged"
    embeddings: str = "tied"
    # Runtime choices (they change the compiled program, not the checkpoint).
    with_vision: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention_backend: str = "auto"    # per call: dense, blockwise, splash or cudnn (ops/backends/auto.py)
    attention_block_size: int = 512

    def __post_init__(self):
        where = "T5Gemma2Config"
        _check(isinstance(self.encoder, TextConfig), where, "encoder", "must be a TextConfig")
        _check(isinstance(self.decoder, TextConfig), where, "decoder", "must be a TextConfig")
        _check(isinstance(self.vision, VisionConfig), where, "vision", "must be a VisionConfig")
        _check(self.cross_attention in CROSS_ATTENTION, where, "cross_attention",
               f"{self.cross_attention!r} not in {CROSS_ATTENTION}")
        _check(self.embeddings in EMBEDDINGS, where, "embeddings", f"{self.embeddings!r} not in {EMBEDDINGS}")
        if self.encoder.hidden_size != self.decoder.hidden_size:
            _check(self.cross_attention == "separate" and self.embeddings == "untied", where, "decoder.hidden_size",
                   f"{self.decoder.hidden_size} != encoder.hidden_size={self.encoder.hidden_size}: unequal widths "
                   "need cross_attention='separate' and embeddings='untied' (merged attention feeds encoder "
                   "states through the decoder's own projections, and a tied table has one width)")
        _check(self.encoder.vocab_size == self.decoder.vocab_size, where, "decoder.vocab_size",
               f"{self.decoder.vocab_size} != encoder.vocab_size={self.encoder.vocab_size} "
               "(the embedding is shared)")
        _positive_int(self, where, "mm_tokens_per_image")
        side = math.isqrt(self.mm_tokens_per_image)
        _check(side * side == self.mm_tokens_per_image, where, "mm_tokens_per_image",
               f"must be a perfect square, got {self.mm_tokens_per_image}")
        _check(self.vision.patches_per_side % side == 0, where, "mm_tokens_per_image",
               f"sqrt({self.mm_tokens_per_image})={side} must divide the "
               f"{self.vision.patches_per_side} patches per side of the vision tower")
        V = self.encoder.vocab_size
        for name in ("image_token_id", "boi_token_id", "eoi_token_id", "pad_token_id",
                     "eos_token_id", "bos_token_id"):
            value = getattr(self, name)
            _check(isinstance(value, int) and 0 <= value < V, where, name,
                   f"must be a token id in [0, {V}), got {value!r}")
        _check(self.dtype in DTYPES, where, "dtype", f"{self.dtype!r} not in {DTYPES}")
        _check(self.param_dtype in DTYPES, where, "param_dtype", f"{self.param_dtype!r} not in {DTYPES}")
        _check(self.remat in REMAT_POLICIES, where, "remat", f"{self.remat!r} not in {tuple(REMAT_POLICIES)}")
        _positive_int(self, where, "attention_block_size")
        _check(self.attention_backend in backends.names(), where, "attention_backend",
               f"{self.attention_backend!r} not in {backends.names()}")

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def replace(self, **kw) -> "T5Gemma2Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Gemma2Config":
        """The config `to_dict` gave (JSON-parsed: lists for tuples), every key checked."""
        return configlib.build(cls, d, cls.__name__)

    def architecture_differences(self, other: "T5Gemma2Config", labels=("self", "other")) -> list[str]:
        """Fields outside `RUNTIME_FIELDS` where `other` differs (`other`'s vision is compared only
        when it has a vision tower): empty when a checkpoint of one loads into the other."""
        mine, theirs = configlib.plain(self), configlib.plain(other)
        a, b = labels
        diffs = []
        for key, value in mine.items():
            if key in RUNTIME_FIELDS or (key == "vision" and not other.with_vision):
                continue
            if isinstance(value, dict):
                diffs += [f"{key}.{k}: {a} {v!r} != {b} {theirs[key][k]!r}" for k, v in value.items()
                          if not same_value(v, theirs[key][k])]
            elif not same_value(value, theirs[key]):
                diffs.append(f"{key}: {a} {value!r} != {b} {theirs[key]!r}")
        return diffs


def same_value(a, b) -> bool:
    """Config values equal, floats once rounded to float32: checkpoints store some (rms_norm_eps) as
    float32, so 1e-6 comes back as 9.999999974752427e-07 and is still the same model."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return a == b or _float32(a) == _float32(b)
    return a == b


def _float32(x: float) -> float:
    rounded = struct.unpack("f", struct.pack("f", x))[0]
    return x if math.isinf(rounded) else rounded       # beyond float32's range: only equal to itself


# ---------------------------------------------------------------------------------------------
# Presets. Numbers from the released google/t5gemma-2-* configs (docs/architecture.md, "The model in brief").
# ---------------------------------------------------------------------------------------------

GEMMA3_VOCAB = 262_144


def _tower(D: int, F: int, L: int, H: int, K: int, W: int) -> TextConfig:
    return TextConfig(
        vocab_size=GEMMA3_VOCAB, hidden_size=D, intermediate_size=F, num_layers=L,
        num_heads=H, num_kv_heads=K, head_dim=256, sliding_window=W,
        layer_types=default_layer_types(L), query_pre_attn_scalar=256.0,
        rope_local_theta=10_000.0, rope_global_theta=1_000_000.0, rope_global_factor=8.0,
    )


def preset(name: str, **overrides) -> T5Gemma2Config:
    """A named model size: '270m-270m', '1b-1b', '4b-4b' or 'tiny' (CPU tests and demos)."""
    if name == "270m-270m":
        t = _tower(D=640, F=2048, L=18, H=4, K=1, W=512)
        cfg = T5Gemma2Config(encoder=t, decoder=t)
    elif name == "1b-1b":
        t = _tower(D=1152, F=6912, L=26, H=4, K=1, W=512)
        cfg = T5Gemma2Config(encoder=t, decoder=t)
    elif name == "4b-4b":
        t = _tower(D=2560, F=10240, L=34, H=8, K=4, W=1024)
        cfg = T5Gemma2Config(encoder=t, decoder=t)
    elif name == "tiny":
        # Small enough for a 2-core CPU, but every feature bites: GQA, windows shorter than the
        # sequence, query_pre_attn_scalar != head_dim, a scanned 6-layer block plus a remainder.
        t = TextConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
            num_kv_heads=2, head_dim=16, sliding_window=8, layer_types=default_layer_types(8),
            query_pre_attn_scalar=24.0, rope_global_factor=8.0, max_position_embeddings=4096,
        )
        vision = VisionConfig(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=2)
        cfg = T5Gemma2Config(encoder=t, decoder=t, vision=vision, mm_tokens_per_image=16,
                             boi_token_id=4, eoi_token_id=5, image_token_id=6)
    else:
        raise ConfigError(f"preset: unknown name {name!r}; expected one of {PRESETS}")
    return cfg.replace(**overrides) if overrides else cfg


PRESETS = ("tiny", "270m-270m", "1b-1b", "4b-4b")

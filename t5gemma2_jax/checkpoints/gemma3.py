"""Build T5Gemma 2 from a Hugging Face Gemma 3 checkpoint (the paper's adaptation initialisation).

    model = adapt_gemma3("path/to/gemma-3-270m")                          # text-only source
    model = adapt_gemma3("path/to/gemma-3-4b-pt", rope_global_factor=8.0)  # SigLIP + projector too

Both towers take every layer of the Gemma 3 checkpoint (the encoder the same weights as the
decoder; merged attention adds no parameter), the one embedding table is shared by the encoder,
the decoder and the LM head, and the SigLIP tower and projector come from the source when it has
them (`Gemma3ForConditionalGeneration`) and are freshly initialised when it has none
(`Gemma3ForCausalLM`). Tensors stream one at a time from the memory-mapped safetensors files into
one host buffer per parameter; a source tensor is read once and written into both towers.

The decisions (see docs/adaptation.md):

* Vocabulary: the first `vocab_size` rows of the source table are kept; the default is
  `min(source vocab, 262144)` (T5Gemma 2's vocabulary), which drops the 64 extra rows of the
  multimodal Gemma 3 checkpoints (262208 rows; the first extra row is Gemma 3's image soft token
  262144). A larger `vocab_size` appends rows from the model's own random init.
* Image soft token: T5Gemma 2's 256001 whenever it lies inside the vocabulary, else the source's
  own image token if that does, else `image_token_id` must be given. Its table row is simply the
  source's row at that id: image tokens are overwritten by image features in the encoder.
* `<start_of_image>` / `<end_of_image>`: the source's ids (Gemma 3's 255999 / 256000 when its
  config names none). `eoi_embedding` replaces the *scaled* embedding of `<end_of_image>`, so by
  default (`eoi_init="source"`) it is the source row at the eoi id times sqrt(D), computed exactly
  as the embedder computes it: every token id then embeds exactly as in Gemma 3.
  `eoi_init="zeros"` gives transformers' initialisation instead.
* RoPE, windows, layer types, `query_pre_attn_scalar`, final-logit soft-capping and
  `max_position_embeddings` follow the source unless overridden (the released T5Gemma 2 uses
  `rope_global_factor=8.0` and 131072 positions at every size).

The property that makes this checkable: with every encoder position masked out
(`attention_mask` all zeros), merged attention reduces to causal self-attention and the adapted
decoder is exactly the Gemma 3 causal language model (for the kept vocabulary rows).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax.checkpoints.hf import read_hf_config, same_tensor
from t5gemma2_jax.checkpoints.hf_config import first_id, text_config_from_hf, vision_config_from_hf
from t5gemma2_jax.checkpoints.hf_mapping import HFEntry
from t5gemma2_jax.checkpoints.hf_text import DECODER_PREFIX, EMBEDDING_KEY, ENCODER_PREFIX, EOI_KEY, text_hf_entries
from t5gemma2_jax.checkpoints.hf_vision import PROJECTOR_PREFIX, VISION_PREFIX, vision_hf_entries
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointDir, CheckpointError
from t5gemma2_jax.checkpoints.staging import HostStaging, get_path
from t5gemma2_jax.checkpoints.triage import DUPLICATED, MISMATCHED, UNKNOWN, KeyTriage
from t5gemma2_jax.config import SHAPE_FIELDS, ConfigError, T5Gemma2Config, TextConfig, VisionConfig
from t5gemma2_jax.model import T5Gemma2

log = logging.getLogger(__name__)

T5GEMMA2_VOCAB = 262_144
T5GEMMA2_IMAGE_TOKEN = 256_001
GEMMA3_BOI_TOKEN = 255_999
GEMMA3_EOI_TOKEN = 256_000
GEMMA3_IMAGE_TOKEN = 262_144
DEFAULT_MM_TOKENS = 256
EOI_INITS = ("source", "zeros")

_TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(TextConfig))
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(T5Gemma2Config) if f.name not in ("encoder", "decoder"))

# Gemma 3 layer names -> T5Gemma 2 layer names (everything else is spelled the same).
_LAYER_RENAMES = {"pre_self_attn_layernorm.": "input_layernorm.",
                  "post_self_attn_layernorm.": "post_attention_layernorm."}

# Source key layouts: Gemma3ForCausalLM (`model.layers.*`), Gemma3TextModel (`layers.*`),
# Gemma3ForConditionalGeneration as transformers >= 5 holds it (`model.language_model.*`,
# `model.vision_tower.*`, `model.multi_modal_projector.*`) and as the Hub / save_pretrained store
# it (`language_model.model.*`, `vision_tower[.vision_model].*`, `multi_modal_projector.*`).
_TEXT_KEY = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)?"
                       r"((?:embed_tokens|layers|norm)\..*)$")
_LM_HEAD_KEY = re.compile(r"^(?:language_model\.)?lm_head\.weight$")
_VISION_KEY = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$")
_PROJECTOR_KEY = re.compile(r"^(?:model\.)?multi_modal_projector\.(.*)$")

_TABLE = "embed_tokens.weight"


def gemma3_key(key: str) -> tuple[str, str] | None:
    """(part, name) of a Gemma 3 checkpoint key in any layout, or None for a key of no known part.

    part is 'text' (name relative to the language model, e.g. 'layers.0.mlp.up_proj.weight'),
    'lm_head', 'vision' (relative to the SigLIP model, without 'vision_model.'), 'vision_head'
    (SigLIP's unused MAP head) or 'projector'.
    """
    if m := _TEXT_KEY.match(key):
        return "text", m.group(1)
    if _LM_HEAD_KEY.match(key):
        return "lm_head", "weight"
    if m := _VISION_KEY.match(key):
        name = m.group(1)
        return ("vision_head" if name.startswith("head.") else "vision"), name
    if m := _PROJECTOR_KEY.match(key):
        return "projector", m.group(1)
    return None


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class Gemma3Source:
    """What a Gemma 3 `config.json` says, in our terms (the source's own vocabulary size)."""

    model_type: str                       # 'gemma3_text' (Gemma3ForCausalLM) or 'gemma3' (multimodal)
    text: TextConfig
    vision: VisionConfig | None           # None: no SigLIP tower in the source
    mm_tokens_per_image: int | None
    boi_token_id: int
    eoi_token_id: int
    image_token_id: int | None            # the source's image soft token (None: text-only source)
    pad_token_id: int
    eos_token_id: int
    bos_token_id: int


def read_gemma3_config(d: dict) -> Gemma3Source:
    """Parse a Gemma 3 `config.json` (current or legacy spelling, text-only or multimodal)."""
    model_type = d.get("model_type")
    if model_type == "gemma3":
        text = d.get("text_config") or {}
        if not isinstance(text, dict):
            raise ConfigError("config.json.text_config: expected a dict")
        where, top = "text_config", d
    elif model_type == "gemma3_text":
        text, where, top = d, "config.json", {}
    else:
        raise ConfigError(f"config.json.model_type: {model_type!r} is not a Gemma 3 checkpoint "
                          "('gemma3_text' for Gemma3ForCausalLM, 'gemma3' for Gemma3ForConditionalGeneration)")
    if text.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}.use_bidirectional_attention: the source is a bidirectional Gemma 3 "
                          "(EmbeddingGemma-style, with a different window rule); adapt a causal Gemma 3")
    if text.get("attn_logit_softcapping") is not None:
        raise ConfigError(f"{where}.attn_logit_softcapping: {text['attn_logit_softcapping']!r}; T5Gemma 2 has "
                          "no attention soft-capping, so the adapted model could not reproduce the source")
    tc = text_config_from_hf(text, where)

    def token(name, default):
        value = text.get(name)
        if value is None:
            value = d.get(name, default)
        return default if value is None else first_id(value)

    return Gemma3Source(
        model_type=model_type, text=tc,
        vision=(vision_config_from_hf(d.get("vision_config") or {}, "vision_config")
                if model_type == "gemma3" else None),
        mm_tokens_per_image=int(d.get("mm_tokens_per_image", DEFAULT_MM_TOKENS)) if model_type == "gemma3" else None,
        boi_token_id=int(top.get("boi_token_index", GEMMA3_BOI_TOKEN)),
        eoi_token_id=int(top.get("eoi_token_index", GEMMA3_EOI_TOKEN)),
        image_token_id=int(top.get("image_token_index", GEMMA3_IMAGE_TOKEN)) if model_type == "gemma3" else None,
        pad_token_id=token("pad_token_id", 0), eos_token_id=token("eos_token_id", 1),
        bos_token_id=token("bos_token_id", 2),
    )


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    text_kw, model_kw = {}, {}
    for key, value in overrides.items():
        if key in SHAPE_FIELDS:          # fixed by the source's tensors: an override could only fail to load
            raise ConfigError(f"adapt_gemma3: {key} comes from the source checkpoint and cannot be overridden")
        if key in ("encoder", "decoder"):
            raise ConfigError(f"adapt_gemma3: {key} is built from the source; override its fields by name "
                              "(e.g. rope_global_factor=8.0), they apply to both towers")
        if key in _TEXT_FIELDS:
            text_kw[key] = value
        elif key in _MODEL_FIELDS:
            model_kw[key] = value
        else:
            raise ConfigError(f"adapt_gemma3: unknown override {key!r}; expected a TextConfig field "
                              f"{sorted(set(_TEXT_FIELDS) - set(SHAPE_FIELDS))} or a T5Gemma2Config field "
                              f"{sorted(_MODEL_FIELDS)}")
    return text_kw, model_kw


def config_from_gemma3(source: dict | Gemma3Source, *, text_only: bool = False, **overrides) -> T5Gemma2Config:
    """The T5Gemma 2 config adapted from a Gemma 3 `config.json` (parsed dict or `Gemma3Source`).

    Both towers get the source's text config with `vocab_size = min(source vocab, 262144)`;
    TextConfig-field overrides (`rope_global_factor=8.0`, `vocab_size=...`, `sliding_window=...`)
    apply to both towers, T5Gemma2Config-field overrides (`image_token_id`, `vision`,
    `mm_tokens_per_image`, `scan_layers`, `dtype`, ...) to the model. `text_only` builds no vision
    tower. A text-only source gets the released SigLIP So400m/896 config and 256 tokens per image
    unless `vision` / `mm_tokens_per_image` are given.
    """
    src = source if isinstance(source, Gemma3Source) else read_gemma3_config(source)
    text_kw, model_kw = _split_overrides(overrides)
    vocab = text_kw.pop("vocab_size", min(src.text.vocab_size, T5GEMMA2_VOCAB))
    try:
        tower = src.text.replace(vocab_size=vocab, **text_kw)
    except ConfigError as e:
        raise ConfigError(f"adapt_gemma3: {e}") from None
    if src.vision is not None:
        vision, mm = src.vision, src.mm_tokens_per_image
        if not text_only and model_kw.get("vision", vision) != vision:
            raise ConfigError(f"adapt_gemma3: vision: the source has its own SigLIP tower ({vision}); "
                              "its config cannot be overridden")
    else:
        vision, mm = VisionConfig(), DEFAULT_MM_TOKENS
    if "image_token_id" not in model_kw:
        if T5GEMMA2_IMAGE_TOKEN < vocab:
            model_kw["image_token_id"] = T5GEMMA2_IMAGE_TOKEN
        elif src.image_token_id is not None and src.image_token_id < vocab:
            model_kw["image_token_id"] = src.image_token_id
        else:
            raise ConfigError(f"T5Gemma2Config.image_token_id: neither T5Gemma 2's {T5GEMMA2_IMAGE_TOKEN} nor the "
                              f"source's image token ({src.image_token_id}) is inside the vocabulary of {vocab}; "
                              "pass image_token_id=... to adapt_gemma3")
    kw: dict[str, Any] = dict(
        encoder=tower, decoder=tower, vision=vision, mm_tokens_per_image=mm,
        boi_token_id=src.boi_token_id, eoi_token_id=src.eoi_token_id, pad_token_id=src.pad_token_id,
        eos_token_id=src.eos_token_id, bos_token_id=src.bos_token_id, with_vision=not text_only)
    kw.update(model_kw)
    try:
        cfg = T5Gemma2Config(**kw)
    except ConfigError as e:
        field = str(e).split(":", 1)[0].rsplit(".", 1)[-1]
        raise ConfigError(f"{e} (pass {field}=... to adapt_gemma3 to override it)") from None
    # Architecture ablations (where the config has them) have parameters Gemma 3 cannot provide.
    for name, released in (("cross_attention", "merged"), ("embeddings", "tied")):
        if getattr(cfg, name, released) != released:
            raise ConfigError(f"adapt_gemma3: {name}={getattr(cfg, name)!r}; the adaptation builds the released "
                              f"architecture ({name}={released!r})")
    return cfg


# ---------------------------------------------------------------------------------------------
# Weights.


def _source_name(hf_key: str) -> tuple[str, str]:
    """The Gemma 3 (part, name) that feeds a T5Gemma 2 key."""
    for prefix in (ENCODER_PREFIX, DECODER_PREFIX):
        if hf_key.startswith(prefix):
            name = hf_key[len(prefix):]
            for ours, theirs in _LAYER_RENAMES.items():
                name = name.replace("." + ours, "." + theirs)
            return "text", name
    if hf_key.startswith(VISION_PREFIX):
        return "vision", hf_key[len(VISION_PREFIX):]
    if hf_key.startswith(PROJECTOR_PREFIX):
        return "projector", hf_key[len(PROJECTOR_PREFIX):]
    raise AssertionError(f"no Gemma 3 source for {hf_key}")


def _plan(cfg: T5Gemma2Config, source_vision: bool) -> tuple[dict[tuple, list[HFEntry]], HFEntry, HFEntry]:
    """{(part, name): [our entries it fills]} plus the embedding-table and eoi entries."""
    plan: dict[tuple, list[HFEntry]] = {}
    table = eoi = None
    for e in text_hf_entries(cfg):
        if e.hf_key == EMBEDDING_KEY:
            table = e
        elif e.hf_key == EOI_KEY:
            eoi = e
        else:
            plan.setdefault(_source_name(e.hf_key), []).append(e)
    if cfg.with_vision and source_vision:
        for e in vision_hf_entries(cfg):
            plan.setdefault(_source_name(e.hf_key), []).append(e.prefixed("vision"))
    assert table is not None and eoi is not None
    return plan, table, eoi


def _fresh_params(cfg: T5Gemma2Config, rngs: nnx.Rngs | int, paths: list[tuple]) -> list:
    """The leaves at `paths` of `T5Gemma2(cfg, rngs=...)`, without materialising the rest.

    Built under `jit`: only the requested leaves are outputs, so XLA drops every other
    initialiser, and the values are those a full construction with the same key would draw."""
    key = rngs.params() if isinstance(rngs, nnx.Rngs) else jax.random.key(int(rngs))

    def init(key):
        pure = nnx.to_pure_dict(nnx.state(T5Gemma2(cfg, rngs=nnx.Rngs(key)), nnx.Param))
        return [get_path(pure, p) for p in paths]

    return jax.jit(init)(key)


def adapt_gemma3(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None, text_only: bool = False,
                 eoi_init: str = "source", rngs: nnx.Rngs | int = 0, return_info: bool = False,
                 **overrides):
    """T5Gemma 2 whose encoder and decoder both start from the Gemma 3 checkpoint at `path`.

    `path` holds a Hugging Face Gemma 3 `config.json` and `*.safetensors` (one file or shards with
    an index; `Gemma3ForCausalLM` or `Gemma3ForConditionalGeneration`, any key layout, bf16 or
    fp32). `dtype` is the compute dtype and, unless `param_dtype` is given, the parameter dtype.
    `text_only=True` builds no vision tower (and skips the source's). `eoi_init` is 'source'
    (the source's <end_of_image> embedding, scaled: the adapted model embeds every id as Gemma 3)
    or 'zeros'. `rngs` (an `nnx.Rngs` or an int seed) initialises what the source lacks: the
    vision tower and projector of a text-only source, table rows beyond the source vocabulary.
    `overrides` are config fields, see `config_from_gemma3` (e.g. `rope_global_factor=8.0`,
    `vocab_size`, `image_token_id`, `vision`, `scan_layers`).

    Returns the model, or `(model, info)` with `return_info=True` (a JSON-able summary of what
    was copied, dropped and initialised).
    """
    if eoi_init not in EOI_INITS:
        raise ConfigError(f"adapt_gemma3: eoi_init={eoi_init!r} not in {EOI_INITS}")
    ckpt = CheckpointDir(path)
    src = read_gemma3_config(read_hf_config(path))
    overrides.setdefault("dtype", jnp.dtype(dtype).name)
    overrides.setdefault("param_dtype", jnp.dtype(param_dtype or dtype).name)
    cfg = config_from_gemma3(src, text_only=text_only, **overrides)
    V_src, V = src.text.vocab_size, cfg.vocab_size
    D = cfg.hidden_size
    if eoi_init == "source" and cfg.eoi_token_id >= V_src:
        raise ConfigError(f"adapt_gemma3: eoi_init='source' but eoi_token_id={cfg.eoi_token_id} is not a row of "
                          f"the source table ({V_src} rows); use eoi_init='zeros'")

    staging = HostStaging(cfg)
    plan, table_entry, eoi_entry = _plan(cfg, src.vision is not None)

    triage, skipped = KeyTriage(), []
    seen: dict[tuple, str] = {}
    table_key = lm_head_key = None
    for raw in ckpt.keys():
        name = gemma3_key(raw)
        if name is None:
            triage.add(UNKNOWN, raw)
            continue
        part = name[0]
        if part == "lm_head":
            lm_head_key = raw
            continue
        if part == "vision_head" or (part in ("vision", "projector") and not cfg.with_vision):
            skipped.append(raw)
            continue
        if name in seen:
            triage.add(DUPLICATED, f"{seen[name]} and {raw}")
            continue
        param_dtype = jnp.dtype(cfg.param_dtype)
        if name == ("text", _TABLE):
            seen[name] = table_key = raw
            triage.check_dtype(ckpt, raw, param_dtype)
            continue
        entries = plan.get(name)
        if entries is None:
            triage.add(UNKNOWN, raw)
            continue
        seen[name] = raw
        if not triage.check_dtype(ckpt, raw, param_dtype):
            continue
        value = ckpt.get(raw)                          # read once, written into every tower using it
        for e in entries:
            ours = e.to_ours(value)
            if not triage.check_shape(raw, ckpt.shape(raw), ours.shape, staging.target_shape(e),
                                      ".".join(map(str, e.path))):
                break
            staging.put(e, ours)
    if table_key is not None and ckpt.shape(table_key) != (V_src, D):
        triage.add(MISMATCHED, f"{table_key}: checkpoint {ckpt.shape(table_key)}, config says ({V_src}, {D})")
    triage.extend("missing tensors", [f"{part}: {n}" for part, n in plan if (part, n) not in seen]
                  + ([] if table_key is not None else [f"text: {_TABLE}"]))
    triage.raise_if_any(f"{path}: not a Gemma 3 checkpoint matching its config.json")

    if lm_head_key is not None and not same_tensor(ckpt, lm_head_key, table_key):
        raise CheckpointError(f"{path}: {lm_head_key} differs from {table_key}; T5Gemma 2 ties the LM head to "
                              "the single shared embedding table")
    table = ckpt.get(table_key)

    # What the source lacks comes from the model's own initialisers.
    fresh_paths = []
    vision_fresh = cfg.with_vision and src.vision is None
    if vision_fresh:
        fresh_paths.append(("vision",))
    if V > V_src:
        fresh_paths.append(table_entry.path)
    fresh = dict(zip(fresh_paths, _fresh_params(cfg, rngs, fresh_paths))) if fresh_paths else {}

    n = min(V, V_src)
    tbuf = staging.buffer(table_entry.path)
    tbuf[:n] = table[:n]
    if V > V_src:
        tbuf[n:] = np.asarray(fresh.pop(table_entry.path)[n:])
    if eoi_init == "source":
        # The embedder computes table[id] * sqrt(D) (sqrt(D) rounded to the parameter dtype) and
        # then substitutes the unscaled eoi vector: the same product makes the substitution a no-op.
        pdt = jnp.dtype(cfg.param_dtype)
        eoi = jnp.asarray(tbuf[cfg.eoi_token_id]) * jnp.asarray(math.sqrt(D), pdt)
        staging.buffer(eoi_entry.path)[...] = np.asarray(eoi)
    else:
        staging.buffer(eoi_entry.path)[...] = 0
    del table

    model = staging.model(fresh)

    c = cfg.decoder
    info = {
        "source": str(path), "source_model_type": src.model_type,
        "vocab": {"source_rows": V_src, "rows": V, "rows_copied": n, "rows_dropped": max(0, V_src - V),
                  "rows_initialised": max(0, V - V_src)},
        "tokens": {"boi": cfg.boi_token_id, "eoi": cfg.eoi_token_id, "image": cfg.image_token_id,
                   "source_image": src.image_token_id, "pad": cfg.pad_token_id, "eos": cfg.eos_token_id,
                   "bos": cfg.bos_token_id},
        "eoi_embedding": (f"source row {cfg.eoi_token_id} x sqrt({D})" if eoi_init == "source" else "zeros"),
        "vision": "none" if not cfg.with_vision else ("initialised" if vision_fresh else "copied"),
        "rope": {"local": {"theta": c.rope_local_theta, "factor": c.rope_local_factor},
                 "global": {"theta": c.rope_global_theta, "factor": c.rope_global_factor}},
        "source_rope": {"local": {"theta": src.text.rope_local_theta, "factor": src.text.rope_local_factor},
                        "global": {"theta": src.text.rope_global_theta, "factor": src.text.rope_global_factor}},
        "max_position_embeddings": c.max_position_embeddings,
        "skipped_tensors": skipped,
    }
    log.info("adapt_gemma3: %s", json.dumps(info))
    return (model, info) if return_info else model

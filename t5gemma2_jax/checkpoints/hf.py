"""Load and save Hugging Face T5Gemma 2 checkpoints (`config.json` + `*.safetensors`).

Loading streams tensor by tensor from memory-mapped files into one host buffer per parameter, and
moves each finished parameter to the device before the next, so a checkpoint never needs two full
copies in host memory. Both key layouts are accepted: the Hub's flat `model.encoder.layers.*` and
transformers' `model.encoder.text_model.layers.*` (and the vision tower with or without its
`vision_model.` segment). Tied copies (decoder embedding, LM head) may be absent; when present
they must equal the shared table. Saving writes the layout transformers itself writes (the Hub's).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax.checkpoints.hf_config import config_from_hf, config_to_hf
from t5gemma2_jax.checkpoints.hf_mapping import HFEntry
from t5gemma2_jax.checkpoints.hf_text import EMBEDDING_KEY, EOI_KEY, ENCODER_PREFIX, text_hf_entries
from t5gemma2_jax.checkpoints.hf_vision import PROJECTOR_PREFIX, VISION_PREFIX, normalize_vision_key, vision_hf_entries
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointDir, CheckpointError, split_shards, write_safetensors
from t5gemma2_jax.checkpoints.staging import HostStaging, get_path
from t5gemma2_jax.checkpoints.triage import UNKNOWN, KeyTriage
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.model import T5Gemma2

log = logging.getLogger(__name__)

TIED_KEYS = {
    "model.decoder.embed_tokens.weight": EMBEDDING_KEY,
    "model.decoder.embed_tokens.eoi_embedding": EOI_KEY,
    "lm_head.out_proj.weight": EMBEDDING_KEY,
}
_FLAT_ENCODER = re.compile(r"^model\.encoder\.(embed_tokens|layers|norm)\.")


def hf_entries(cfg: T5Gemma2Config) -> list[HFEntry]:
    if cfg.cross_attention != "merged" or cfg.embeddings != "tied":
        raise CheckpointError(
            f"the Hugging Face T5Gemma 2 format holds only the released architecture (merged attention, "
            f"tied embeddings); this model has cross_attention={cfg.cross_attention!r}, "
            f"embeddings={cfg.embeddings!r}: save it with the trainer's Orbax export instead")
    entries = text_hf_entries(cfg)
    if cfg.with_vision:
        entries += [e.prefixed("vision") for e in vision_hf_entries(cfg)]
    return entries


def canonical_key(key: str) -> str:
    """Map the Hub's flat encoder keys and the vision_model segment onto transformers' current names."""
    if _FLAT_ENCODER.match(key):
        return ENCODER_PREFIX + key[len("model.encoder."):]
    return normalize_vision_key(key)


def hub_key(canonical: str) -> str:
    """The key transformers itself writes (and the Hub holds): the encoder's text model flat."""
    if canonical.startswith(ENCODER_PREFIX):
        return "model.encoder." + canonical[len(ENCODER_PREFIX):]
    return canonical


def _is_vision(key: str) -> bool:
    return key.startswith((VISION_PREFIX, PROJECTOR_PREFIX))


def read_hf_config(path: str | os.PathLike) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def load_hf(path: str | os.PathLike, dtype=jnp.float32, text_only: bool = False, *,
            param_dtype=None, **config_overrides) -> T5Gemma2:
    """Build a `T5Gemma2` from a Hugging Face checkpoint directory.

    `dtype` is the compute dtype and, unless `param_dtype` is given, the parameter dtype.
    `text_only=True` skips the vision tower and projector (by key name) and builds no vision module.
    `config_overrides` set runtime fields of the config (`config.RUNTIME_FIELDS`, e.g.
    `scan_layers=False`, `remat='full'`).
    """
    ckpt = CheckpointDir(path)
    cfg = config_from_hf(read_hf_config(path), dtype=jnp.dtype(dtype).name,
                         param_dtype=jnp.dtype(param_dtype or dtype).name,
                         with_vision=not text_only, **config_overrides)
    staging = HostStaging(cfg)
    entries = {e.hf_key: e for e in hf_entries(cfg)}
    keys = {}
    for key in ckpt.keys():
        keys.setdefault(canonical_key(key), key)

    triage, skipped_vision, tied = KeyTriage(), [], []
    for canon, raw_key in keys.items():
        if canon in TIED_KEYS:
            tied.append((canon, raw_key))
            continue
        if canon not in entries:
            if _is_vision(canon) and (text_only or canon.startswith(VISION_PREFIX + "head.")):
                skipped_vision.append(raw_key)
            else:
                triage.add(UNKNOWN, raw_key)
            continue
        entry = entries[canon]
        value = entry.to_ours(ckpt.get(raw_key))
        if triage.check_shape(raw_key, ckpt.shape(raw_key), value.shape, staging.target_shape(entry)):
            staging.put(entry, value)
    triage.extend("missing keys", (k for k in entries if k not in keys))
    triage.raise_if_any(f"{path}: checkpoint does not match the model config")
    for canon, raw_key in tied:
        source = TIED_KEYS[canon]
        if not np.array_equal(ckpt.get(raw_key), ckpt.get(keys[source])):
            raise CheckpointError(f"{path}: {raw_key} differs from {source}; T5Gemma 2 ties them and "
                                  "this implementation has a single shared table")
    if skipped_vision:
        log.warning("load_hf: text_only=True, skipped %d vision tower/projector tensors", len(skipped_vision))
    return staging.model()


def save_hf(model: T5Gemma2, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30) -> None:
    """Write `model` as a directory `T5Gemma2ForConditionalGeneration.from_pretrained` loads.

    Tensors keep the parameter dtype. Tied copies are not written (transformers re-ties them).
    A model without its vision tower writes none (transformers then initialises it afresh).
    """
    cfg: T5Gemma2Config = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = []
    for e in hf_entries(cfg):
        arr = get_path(pure, e.path)
        sliced = jax.ShapeDtypeStruct(e.tensor_shape(arr.shape), arr.dtype)
        shape = jax.eval_shape(e.to_hf, sliced).shape

        def produce(arr=arr, e=e):
            host = np.asarray(arr[e.index] if e.index is not None else arr)
            return e.to_hf(host)

        tensors.append((hub_key(e.hf_key), shape, np.dtype(arr.dtype), produce))
    for old in path.glob("*.safetensors"):
        old.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    shards = list(split_shards(tensors, max_shard_size))
    if len(shards) == 1:
        write_safetensors(path / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(path / name, shard)
            weight_map.update({t[0]: name for t in shard})
        total = sum(int(np.prod(t[1])) * np.dtype(t[2]).itemsize for t in tensors)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    param_dtype = jnp.dtype(cfg.param_dtype).name
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, param_dtype), indent=2))

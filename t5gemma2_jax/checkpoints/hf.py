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
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax import storage
from t5gemma2_jax.checkpoints.hf_config import config_from_hf, config_to_hf
from t5gemma2_jax.checkpoints.hf_mapping import HFEntry
from t5gemma2_jax.checkpoints.hf_text import EMBEDDING_KEY, EOI_KEY, ENCODER_PREFIX, text_hf_entries
from t5gemma2_jax.checkpoints.hf_vision import PROJECTOR_PREFIX, VISION_PREFIX, normalize_vision_key, vision_hf_entries
from t5gemma2_jax.checkpoints.safetensors_io import (INDEX_NAME, CheckpointDir, CheckpointError, split_shards,
                                                    write_safetensors)
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
MANIFEST = "t5gemma2_jax_save.json"
_TIED_CHUNK_BYTES = 64 * 2**20


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
    cfg_path = storage.as_path(path) / "config.json"
    _check_not_half_saved(storage.as_path(path))
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def same_tensor(ckpt: CheckpointDir, a: str, b: str) -> bool:
    """Compares two stored tensors a block of rows at a time: tied copies are the size of the
    embedding table, and two whole copies on the host next to the staged model would double the
    table's share of peak memory."""
    shape = ckpt.shape(a)
    if shape != ckpt.shape(b):
        return False
    if not shape:
        return bool(np.array_equal(ckpt.get(a), ckpt.get(b)))
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * 8)
    step = max(1, _TIED_CHUNK_BYTES // row_bytes)
    return all(np.array_equal(ckpt.get_rows(a, i, i + step), ckpt.get_rows(b, i, i + step))
               for i in range(0, shape[0], step))


def load_hf(path: str | os.PathLike, dtype=jnp.float32, text_only: bool = False, *,
            param_dtype=None, **config_overrides) -> T5Gemma2:
    """Build a `T5Gemma2` from a Hugging Face checkpoint directory.

    `dtype` is the compute dtype and, unless `param_dtype` is given, the parameter dtype.
    `text_only=True` skips the vision tower and projector (by key name) and builds no vision module.
    `config_overrides` set runtime fields of the config (`config.RUNTIME_FIELDS`, e.g.
    `scan_layers=False`, `remat='full'`).
    """
    _check_not_half_saved(storage.as_path(path))
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
            target = get_path(staging.pure, entries[TIED_KEYS[canon]].path).dtype
            if triage.check_dtype(ckpt, raw_key, target):
                tied.append((canon, raw_key))
            continue
        if canon not in entries:
            if _is_vision(canon) and (text_only or canon.startswith(VISION_PREFIX + "head.")):
                skipped_vision.append(raw_key)
            else:
                triage.add(UNKNOWN, raw_key)
            continue
        entry = entries[canon]
        if not triage.check_dtype(ckpt, raw_key, get_path(staging.pure, entry.path).dtype):
            continue
        value = entry.to_ours(ckpt.get(raw_key))
        if triage.check_shape(raw_key, ckpt.shape(raw_key), value.shape, staging.target_shape(entry)):
            staging.put(entry, value)
    triage.extend("missing keys", (k for k in entries if k not in keys))
    triage.raise_if_any(f"{path}: checkpoint does not match the model config")
    for canon, raw_key in tied:
        source = TIED_KEYS[canon]
        if not same_tensor(ckpt, raw_key, keys[source]):
            raise CheckpointError(f"{path}: {raw_key} differs from {source}; T5Gemma 2 ties them and "
                                  "this implementation has a single shared table")
    if skipped_vision:
        log.warning("load_hf: text_only=True, skipped %d vision tower/projector tensors", len(skipped_vision))
    return staging.model()


def _is_clobbered(name: str) -> bool:
    """Files a save writes or removes; anything else in the directory (a tokenizer, a README) is
    left alone and never blocks a save."""
    return name.endswith(".safetensors") or name in ("config.json", INDEX_NAME, MANIFEST)


def _read_manifest(path, *, complete_only: bool = False) -> list[str] | None:
    try:
        raw = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f == Path(f).name for f in files):
        return None
    if complete_only and raw.get("complete") is False:
        return None
    return files


def _check_not_half_saved(path) -> None:
    """In an object store a save writes in place (no renames there): until its manifest says it
    is complete, the directory holds a mix of two saves, which is refused."""
    if storage.is_url(path) and (path / MANIFEST).exists() and _read_manifest(path, complete_only=True) is None:
        raise CheckpointError(f"{path}: a save_hf into it did not finish ({MANIFEST} does not mark it complete); "
                              "save again")


def _previous_save(path) -> tuple[list[str], list[str]]:
    """(files an earlier `save_hf` left in `path`, files there a save would overwrite or remove that
    no `save_hf` wrote). Ownership is what the manifest lists: without one, weights or a config
    may be a user's or transformers' own, which a save must not destroy."""
    if not path.exists():
        return [], []
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    manifest = _read_manifest(path) if (path / MANIFEST).exists() else []
    ours, foreign = [], []
    for name in sorted(p.name for p in path.iterdir()):
        if not _is_clobbered(name):
            continue
        entry = path / name
        if manifest is not None and (name == MANIFEST or (name in manifest and entry.is_file()
                                                          and not (storage.is_local(entry) and entry.is_symlink()))):
            ours.append(name)
        else:
            foreign.append(name + (" (unreadable)" if name == MANIFEST else ""))
    return ours, foreign


def _write_manifest(path, files, *, complete: bool = True) -> None:
    manifest = {"written_by": "t5gemma2_jax.save_hf", "files": sorted(set(files))}
    if not complete:
        manifest["complete"] = False
    storage.write_text(path / MANIFEST, json.dumps(manifest, indent=2))


def save_hf(model: T5Gemma2, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30) -> None:
    """Write `model` as a directory `T5Gemma2ForConditionalGeneration.from_pretrained` loads.

    Tensors keep the parameter dtype. Tied copies are not written (transformers re-ties them).
    A model without its vision tower writes none (transformers then initialises it afresh).

    Every file is written in full into a temporary sibling directory first and only then renamed
    into `path` (the same file system, so each rename is atomic), after which the previous save's
    files that the new one does not replace are removed: a save interrupted while writing, which
    is nearly all of its time, leaves the previous checkpoint as it was. Only a crash between the
    final renames can leave old and new files mixed; the manifest lists both meanwhile, so saving
    again repairs the directory.

    `path` must be new, empty, or an earlier `save_hf`'s (its manifest, `t5gemma2_jax_save.json`,
    lists the files it wrote): weights, an index or a config.json that no save wrote are refused
    before anything is written. Other files (a tokenizer, a README) stay untouched.

    In an object store (`gs://`), where nothing can be renamed, each file is written in place as
    one whole object, between a manifest marking the directory incomplete (which `load_hf`
    refuses) and the one marking it complete: that last object is the save's commit.
    """
    cfg: T5Gemma2Config = model.config
    path = storage.as_path(path)
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
    shards = list(split_shards(tensors, max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)])

    previous, foreign = _previous_save(path)
    if foreign:
        raise CheckpointError(f"{path}: save_hf would overwrite or remove {', '.join(foreign)}, which no earlier "
                              "save_hf wrote there; save into another directory or remove them first")
    if storage.is_url(path):
        _save_hf_objects(path, cfg, names, shards, tensors, previous)
        return
    home = path.resolve()                          # a sibling of the real directory: renames must not cross devices
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}.", suffix=".saving", dir=home.parent))
    try:
        written = _write_files(staging, cfg, names, shards, tensors)

        path.mkdir(exist_ok=True)
        # While files move, old and new are both ours: a crash here must not lock the user out.
        _write_manifest(path, [*previous, *written])
        for name in written:                       # weights, then the index that points at them, then config
            os.replace(staging / name, path / name)
        stale = [n for n in previous if n not in written and n != MANIFEST]
        for name in sorted(stale, key=lambda n: n != INDEX_NAME):   # an index to old shards goes first
            (path / name).unlink(missing_ok=True)
        _write_manifest(path, written)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_files(directory, cfg: T5Gemma2Config, names: list[str], shards: list, tensors: list) -> list[str]:
    """Weights, then the index that points at them, then config.json; the names written."""
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard)
    if len(shards) > 1:
        weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
        total = sum(int(np.prod(t[1])) * np.dtype(t[2]).itemsize for t in tensors)
        storage.write_text(directory / INDEX_NAME,
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    param_dtype = jnp.dtype(cfg.param_dtype).name
    storage.write_text(directory / "config.json", json.dumps(config_to_hf(cfg, param_dtype), indent=2))
    return names + ([INDEX_NAME] if len(shards) > 1 else []) + ["config.json"]


def _save_hf_objects(path, cfg: T5Gemma2Config, names: list[str], shards: list, tensors: list,
                     previous: list[str]) -> None:
    """`save_hf` into an object store: in place, between an incomplete and a complete manifest."""
    new = names + ([INDEX_NAME] if len(shards) > 1 else []) + ["config.json"]
    _write_manifest(path, [*previous, *new], complete=False)
    written = _write_files(path, cfg, names, shards, tensors)
    for name in sorted((n for n in previous if n not in written and n != MANIFEST), key=lambda n: n != INDEX_NAME):
        storage.remove(path / name)
    _write_manifest(path, written)

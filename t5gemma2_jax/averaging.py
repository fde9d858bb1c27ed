"""Checkpoint averaging: the elementwise mean of the parameters of several checkpoints of one
architecture, written as a params export that `load`, `train.init_from` and `scripts/generate.py`
read (the T5Gemma papers average their last checkpoints before evaluating).

    average_checkpoints(last_checkpoints("workdirs/run", 5), "workdirs/run/export_avg5")
    average_checkpoints(["runs/a/export", "runs/b/export"], "soup")      # any `find_source` paths

Each source is read the way `load` reads it (a run's step without its optimizer state and verified
against its checksums, an export, a Hugging Face directory), a group of parameters at a time, so
host memory holds the averaged model plus one group from each source. Sums are float32; each
parameter is stored in its model dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from t5gemma2_jax.checkpoints.export import param_name, save_export
from t5gemma2_jax.checkpoints.run import run_checkpoint
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.checkpoints.sources import Source, find_source
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.loading import TOKENIZER_FILE, run_config
from t5gemma2_jax.model import T5Gemma2

PROVENANCE_FILE = "averaged_from.json"


def last_checkpoints(workdir: str | os.PathLike, n: int) -> list[Path]:
    """The step directories of the `n` newest complete checkpoints of a run (oldest first)."""
    if n < 1:
        raise ConfigError(f"--last: must be >= 1, got {n}")
    newest = run_checkpoint(workdir)
    if newest is None:
        raise ConfigError(f"{workdir}: no complete checkpoint (a training work directory or its checkpoints/)")
    steps = sorted(int(c.name) for c in newest.parent.iterdir() if c.name.isdigit() and (c / "state").is_dir())
    if len(steps) < n:
        raise ConfigError(f"{workdir}: {len(steps)} complete checkpoint(s) {steps}, fewer than --last {n} "
                          "(a run keeps train.keep_checkpoints of them)")
    return [newest.parent / str(s) for s in steps[-n:]]


def param_shapes(cfg: T5Gemma2Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Every parameter of a `T5Gemma2(cfg)` by name, nothing allocated."""
    abstract = nnx.eval_shape(lambda: T5Gemma2(cfg, rngs=nnx.Rngs(0)))
    return {param_name(p): jax.ShapeDtypeStruct(v.shape, v.dtype)
            for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def average_checkpoints(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        group_bytes: int = 1 << 30) -> Path:
    """Writes the mean of the parameters of `paths` (anything `find_source` names, LoRA runs
    excepted) to the params export `out` and returns it; ConfigError / CheckpointError naming the
    source when they are not one architecture. `group_bytes`: float32 bytes read per source at once."""
    if len(paths) < 2:
        raise ConfigError(f"need at least two checkpoints to average, got {len(paths)}")
    sources = [find_source(p) for p in paths]
    for s in sources:
        if s.holds_adapters:
            raise ConfigError(f"{s.path}: a LoRA run holds adapters, not a model; merge them first "
                              "(load(...) then adapters.merge_lora and save_export)")
    configs = [s.model_config() for s in sources]
    shapes = param_shapes(configs[0])
    _check_same_architecture(sources, configs, shapes)
    readers = [_reader(s, c) for s, c in zip(sources, configs)]
    averaged: dict[str, jax.Array] = {}
    for group in _groups(shapes, group_bytes):
        wanted = {n: shapes[n] for n in group}
        sums = {n: np.zeros(shapes[n].shape, np.float32) for n in group}
        for read in readers:
            for n, a in read(wanted).items():
                sums[n] += np.asarray(a, np.float32)
        for n in group:
            averaged[n] = jax.device_put((sums[n] / len(sources)).astype(shapes[n].dtype), jax.devices("cpu")[0])
    out = save_export(out, configs[0], averaged)
    if jax.process_index() == 0:
        _record_provenance(out, sources)
    return out


def _check_same_architecture(sources: list[Source], configs: list[T5Gemma2Config], shapes: dict) -> None:
    first = sources[0].path
    for s, c in zip(sources[1:], configs[1:]):
        theirs = param_shapes(c)
        wrong = [f"{n}: {tuple(shapes[n].shape)} in {first} but {tuple(theirs[n].shape)} in {s.path}"
                 for n in shapes if n in theirs and shapes[n].shape != theirs[n].shape]
        missing = sorted(set(shapes) ^ set(theirs))
        if wrong or missing:
            detail = "; ".join(wrong[:3]) if wrong else f"parameters in one but not the other, e.g. {missing[:3]}"
            raise CheckpointError(f"cannot average checkpoints of different shapes: {len(wrong) or len(missing)} "
                                  f"parameters differ ({detail})")
        diffs = configs[0].architecture_differences(c, labels=(str(first), str(s.path)))
        if diffs:
            raise CheckpointError(f"cannot average checkpoints of different architectures: {'; '.join(diffs[:3])}")


def _reader(src: Source, cfg: T5Gemma2Config):
    """`read(shapes) -> {name: array}` of one source, into host memory (not an accelerator's)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    if src.kind != "hf":
        return lambda shapes: src.read_params(cfg, shapes, {n: cpu for n in shapes})
    # A Hugging Face directory is read whole once (its tensors are not stored by our names).
    cache: dict[str, jax.Array] = {}

    def read(shapes):
        if not cache:
            every = param_shapes(cfg)
            cache.update(src.read_params(cfg, every, {n: cpu for n in every}))
        return {n: cache.pop(n) for n in shapes}
    return read


def _groups(shapes: dict[str, jax.ShapeDtypeStruct], group_bytes: int) -> list[list[str]]:
    groups, current, size = [], [], 0
    for n, s in shapes.items():
        nbytes = 4 * int(np.prod(s.shape))
        if current and size + nbytes > group_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    return groups + ([current] if current else [])


def _record_provenance(out: Path, sources: list[Source]) -> None:
    """Which checkpoints went in, and the tokenizer of the first one's run beside the export (an
    export outside its run's work directory has no run config to name it)."""
    (out / PROVENANCE_FILE).write_text(json.dumps(
        {"sources": [{"path": str(s.path), "kind": s.kind, "step": s.step} for s in sources]}, indent=1) + "\n")
    run = run_config(sources[0])
    tokenizer = run.data.tokenizer if run is not None else None
    if tokenizer is None and (sources[0].path / TOKENIZER_FILE).is_file():
        tokenizer = str(sources[0].path / TOKENIZER_FILE)
    if tokenizer is not None and Path(tokenizer).is_file() and not (out / TOKENIZER_FILE).exists():
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)

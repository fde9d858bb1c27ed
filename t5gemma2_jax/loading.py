"""`load(path)`: a model for inference from anything the project writes or reads.

    model = load("workdirs/demo")                    # a training work directory: its newest complete step
    model = load("workdirs/demo/checkpoints/200")    # one step directory
    model = load("workdirs/demo/export")             # the params export written at the end of a run
    model = load("t5gemma-2-270m-270m")              # a Hugging Face directory (config.json + safetensors)
    model = load("workdirs/lora")                    # a LoRA run: its base (train.init_from) + its adapters
    tok = load_tokenizer_for("workdirs/demo", model.config)

A run's checkpoint is read without its optimizer state (the parameter groups only, verified against
the checksums the run saved), so a run stopped by SIGTERM or run with `train.export_at_end=false`
is as usable as a finished one. `find_source` says which of these a path is; `train.init_from`
reads the same kinds of path.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from t5gemma2_jax.checkpoints.export import model_from_arrays
from t5gemma2_jax.checkpoints.hf import load_hf
from t5gemma2_jax.checkpoints.run import checksums, load_run_params
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.checkpoints.sources import Source, find_source
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data import DataConfig, Tokenizer, load_tokenizer
from t5gemma2_jax.data.tiny_tokenizer import TINY_VOCAB_SIZE
from t5gemma2_jax.experiment import ExperimentConfig, from_dict
from t5gemma2_jax.model import T5Gemma2

TOKENIZER_FILE = "tokenizer.model"


def run_config(src: Source) -> ExperimentConfig | None:
    """The training config of the run a checkpoint belongs to (None: no run's)."""
    raw = src.run_config()
    return None if raw is None else from_dict(raw)


def load(path: str | os.PathLike | Source, *, dtype: str | None = None, text_only: bool = False,
         adapter: str | os.PathLike | None = None, quantize_base: str | None = None, mesh=None,
         rules=None, attention_backend: str | None = None) -> T5Gemma2:
    """The `T5Gemma2` that `path` holds (see the module docstring), computing in `dtype` (default:
    as stored). `adapter`: a PEFT LoRA directory applied unmerged on top, with the base stored
    `quantize_base` ("int8", "nf4"; a LoRA run: as it trained). `text_only` skips the vision tower
    of a Hugging Face checkpoint. With a `mesh` parameters are sharded by the logical-axis `rules`.
    `attention_backend` replaces the one the run trained with (default: as stored), e.g. `auto`
    for a model trained with `dense` on short inputs and scored on long ones."""
    from t5gemma2_jax.adapters import load_peft, quantize_base as quantize

    src = path if isinstance(path, Source) else find_source(path)
    overrides = {} if dtype is None else {"dtype": str(dtype)}
    if attention_backend is not None:
        overrides["attention_backend"] = str(attention_backend)
    if src.holds_adapters:
        return _load_lora_run(src, overrides, adapter, quantize_base, mesh, rules)
    if src.kind == "hf":
        import jax.numpy as jnp

        runtime = {k: v for k, v in overrides.items() if k != "dtype"}
        model = load_hf(src.path, dtype=jnp.dtype(dtype or "float32"), text_only=text_only, **runtime)
    else:
        cfg = src.model_config()
        cfg = cfg.replace(**overrides) if overrides else cfg
        model = model_from_arrays(cfg, functools.partial(src.read_params, cfg), mesh, rules)
    if quantize_base and quantize_base != "none":
        quantize(model, quantize_base)
    if adapter:
        load_peft(model, adapter)
    return model


def _load_lora_run(src: Source, overrides: dict, adapter, quantize_base, mesh, rules) -> T5Gemma2:
    """The base of a LoRA run (its train.init_from) with the run's adapters: from its newest
    checkpoint (verified to belong to that base) or, without checkpoints, its final adapter/."""
    from t5gemma2_jax.adapters import load_peft
    from t5gemma2_jax.modeldef import ModelDef

    run = run_config(src)
    base = load(src.base_path(), dtype=overrides.get("dtype"), mesh=mesh, rules=rules,
                attention_backend=overrides.get("attention_backend"))
    lora = run.lora if quantize_base is None else dataclasses.replace(run.lora, quantize_base=quantize_base)
    if src.kind == "adapter" or adapter:
        from t5gemma2_jax.adapters import quantize_base as quantize

        if lora.quantize_base != "none":
            quantize(base, lora.quantize_base)
        load_peft(base, adapter or src.path)
        return base
    model_def = ModelDef(base.config, lora=lora)
    _, frozen = model_def.split(model_def.adapt(base, run.train.seed))
    if checksums(frozen) != src.meta.get("base_checksums"):
        raise CheckpointError(f"{src.path}: its adapters were trained on another base than "
                              f"{run.train.init_from} (the base's checksums differ)")
    adapters = load_run_params(src.path, model_def.shapes("trainable"), adapters=True)
    return model_def.merge(adapters, frozen)


def load_tokenizer_for(path: str | os.PathLike | Source, model_config: T5Gemma2Config,
                       tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint: `tokenizer` when given, else the one its training run used, else
    the `tokenizer.model` beside a Hugging Face checkpoint (a 512-piece model: the tiny tokenizer); checked against the model's vocabulary
    and special ids (ConfigError naming the mismatch)."""
    from t5gemma2_jax.data.pipeline import check_model_compatible

    src = path if isinstance(path, Source) else find_source(path)
    data = None
    if tokenizer is not None:
        data = DataConfig(tokenizer=str(tokenizer))
    else:
        run = run_config(src)
        if run is not None:
            data = run.data
        elif (src.path / TOKENIZER_FILE).is_file():
            data = DataConfig(tokenizer=str(src.path / TOKENIZER_FILE))
        elif model_config.vocab_size == TINY_VOCAB_SIZE:   # the tiny preset's own tokenizer (data.tokenizer unset)
            data = DataConfig()
    if data is None:
        raise ConfigError(f"--tokenizer: {src.path} records no tokenizer (no training config beside it, no "
                          f"{TOKENIZER_FILE}); pass the model's SentencePiece model")
    tok = load_tokenizer(data)
    check_model_compatible(tok, model_config, dataclasses.replace(data, max_images_per_row=0))
    return tok

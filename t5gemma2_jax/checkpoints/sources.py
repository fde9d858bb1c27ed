"""What a checkpoint path names: a training run's step (a work directory's newest complete one,
a `checkpoints/` directory, one step directory), a params export, a Hugging Face directory, or a
LoRA run holding only its final adapter. `t5gemma2_jax.load` (inference, evaluation) and
`train.init_from` (fine-tuning) resolve paths here, so they accept the same things."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from t5gemma2_jax import storage
from t5gemma2_jax.checkpoints.export import (CONFIG_FILE as EXPORT_CONFIG, flat_params, is_export, load_export_arrays,
                                             read_export_config)
from t5gemma2_jax.checkpoints.hf import load_hf, read_hf_config
from t5gemma2_jax.checkpoints.hf_config import config_from_hf
from t5gemma2_jax.checkpoints.run import load_run_params, read_run_meta, run_checkpoint
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.configlib import ConfigError, load_yaml
from t5gemma2_jax.storage import AnyPath

RUN_CONFIG = "config.yaml"   # the resolved config a run writes into its work directory

KINDS = ("run", "export", "hf", "adapter")


@dataclasses.dataclass(frozen=True)
class Source:
    """What a path names: `kind` "run" (a training checkpoint's step directory), "export" (a params
    export), "hf" (a Hugging Face directory) or "adapter" (a LoRA run's work directory holding only
    its final `adapter/`); `path` the directory read; `workdir` the training run it belongs to."""

    kind: str
    path: AnyPath
    workdir: AnyPath | None = None
    meta: dict | None = None            # a run checkpoint's metadata (its config, model config, step)

    @property
    def step(self) -> int | None:
        return None if self.meta is None else self.meta.get("step")

    @property
    def holds_adapters(self) -> bool:
        """A LoRA run's checkpoint: adapters only; the model is its base plus them."""
        return self.kind == "adapter" or "base_checksums" in (self.meta or {})

    def run_config(self) -> dict | None:
        """The training config (raw, as `ExperimentConfig.from_dict` takes it) the checkpoint was
        written with, or None when the path is no run's."""
        if self.meta is not None and "config" in self.meta:
            return self.meta["config"]
        if self.workdir is not None and (self.workdir / RUN_CONFIG).is_file():
            return load_yaml(self.workdir / RUN_CONFIG)
        return None

    def model_config(self) -> T5Gemma2Config:
        """The architecture stored with the checkpoint (a LoRA run's: its base's)."""
        if self.holds_adapters:
            return find_source(self.base_path(), what="train.init_from").model_config()
        if self.kind == "run":
            if "model_config" not in self.meta:
                raise CheckpointError(f"{self.path}: the checkpoint's metadata has no model_config")
            return T5Gemma2Config.from_dict(self.meta["model_config"])
        if self.kind == "export":
            return read_export_config(self.path)
        return config_from_hf(read_hf_config(self.path))

    def read_params(self, config: T5Gemma2Config, shapes: dict[str, jax.ShapeDtypeStruct],
                    shardings: dict[str, Any] | None = None) -> dict[str, jax.Array]:
        """The parameters named in `shapes` (flat, by `param_name`), placed with `shardings`
        (default: the first local device): the one reader of a checkpoint's weights for
        `train.init_from` and `load`. A Hugging Face checkpoint is built as `config` lays it out
        (dtypes, scanned layers, with or without the vision tower)."""
        if self.kind == "run":
            return load_run_params(self.path, shapes, shardings)
        if self.kind == "export":
            return load_export_arrays(self.path, shapes, shardings)
        if self.kind != "hf":
            raise CheckpointError(f"{self.path}: a LoRA run's adapter directory holds no model parameters")
        with jax.default_device(jax.devices("cpu")[0]):  # host memory, not one accelerator
            model = load_hf(self.path, dtype=config.dtype, param_dtype=config.param_dtype,
                            text_only=not config.with_vision, scan_layers=config.scan_layers, remat=config.remat)
        flat = {n: np.asarray(v) for n, v in flat_params(model).items()}
        del model
        missing = sorted(set(shapes) - set(flat))
        if missing:
            raise CheckpointError(f"{self.path}: the checkpoint lacks {len(missing)} parameters of the model "
                                  f"(e.g. {missing[:3]})")
        if shardings is None:
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = {n: dev for n in shapes}
        return {n: jax.device_put(flat.pop(n), shardings[n]) for n in shapes}

    def base_path(self) -> str:
        """A LoRA run's base: its `train.init_from`."""
        base = ((self.run_config() or {}).get("train") or {}).get("init_from")
        if not base:
            raise ConfigError(f"{self.workdir or self.path}: the LoRA run trained on a random base (no "
                              "train.init_from); there is no base to load")
        return base


def find_source(path: str | os.PathLike, *, what: str = "--checkpoint") -> Source:
    """Which loadable thing `path` is (a local path or a `gs://` URL); ConfigError naming it when
    it is none of them."""
    p = storage.as_path(path)
    with storage.storage_op("reading", p):
        return _find_source(p, what)


def _find_source(p: AnyPath, what: str) -> Source:
    if not p.is_dir():
        raise ConfigError(f"{what} {p}: no such directory")
    parent_run = p.parent if (p.parent / RUN_CONFIG).is_file() else None
    if is_export(p):
        return Source("export", p, workdir=parent_run)
    if (p / "config.json").is_file():
        return Source("hf", p)
    step_dir = run_checkpoint(p)
    if step_dir is not None:
        workdir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else None
        return Source("run", step_dir, workdir=workdir, meta=read_run_meta(step_dir))
    if is_export(p / "export"):
        return Source("export", p / "export", workdir=p)
    if (p / "adapter").is_dir() and (p / RUN_CONFIG).is_file():
        return Source("adapter", p / "adapter", workdir=p)
    if (p / "checkpoints").is_dir():
        raise ConfigError(f"{what} {p}: the work directory has no complete checkpoint yet")
    raise ConfigError(f"{what} {p}: neither a training work directory, a step directory "
                      f"(checkpoints/<step>), a params export ({EXPORT_CONFIG}) nor a Hugging Face "
                      "directory (config.json)")

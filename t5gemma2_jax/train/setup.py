"""What a run checks before its first compile (work directory, data, tokenizer, pretrained
weights), the resolved config it saves and the pretrained weights it may start from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import yaml

from t5gemma2_jax import storage
from t5gemma2_jax.config import ConfigError
from t5gemma2_jax.experiment import ExperimentConfig
from t5gemma2_jax.parallel import SetupError
from t5gemma2_jax.storage import AnyPath
from t5gemma2_jax.train.state import pretrained_source
from t5gemma2_jax.train.trainer import Trainer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def check_workdir(workdir: str | os.PathLike) -> AnyPath:
    """The work directory, created (a local one, which must take a write) or, in an object store,
    its bucket checked to exist: a bucket is never created by accident from a mistyped name."""
    if storage.is_url(workdir):
        path = storage.as_path(workdir)
        try:
            with storage.storage_op("checking the bucket of", workdir):
                found = storage.as_path(storage.bucket(workdir)).exists()
        except storage.StorageError as e:
            raise SetupError(f"--workdir: {e}") from None
        if not found:
            raise SetupError(f"--workdir {str(workdir)!r}: bucket {storage.bucket(workdir)} does not exist "
                             "(or these credentials cannot see it)")
        return path
    path = Path(workdir).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SetupError(f"--workdir {str(path)!r} is not a writable directory: "
                         f"{e.strerror or e.__class__.__name__}") from None
    return path


def prepare(cfg: ExperimentConfig, workdir: str | os.PathLike, devices=None) -> tuple[AnyPath, Trainer]:
    """The work directory and the run's `Trainer`, everything validated against the machine;
    raises ConfigError / SetupError naming the problem. Compiles nothing and allocates nothing on
    the devices. `train.init_from` is opened (its kind and architecture, which the model takes;
    not its weights) and the tokenizer is checked against that model."""
    path = check_workdir(workdir)
    trainer = Trainer.build(cfg, devices=devices)
    t = cfg.train
    if t.init_from is not None:
        pretrained_source(cfg.init_source, trainer.model_config)
    if t.data_source == "pipeline":
        if t.eval_every and cfg.data.train and not cfg.data.eval:
            raise ConfigError("train.eval_every > 0 needs held-out data: set data.eval (or train.eval_every=0)")
        from t5gemma2_jax.data import check_data_files, check_model_compatible, load_tokenizer

        check_data_files(cfg.data)
        check_model_compatible(load_tokenizer(cfg.data), trainer.model_config, cfg.data)
    if t.compilation_cache_dir:
        use_compilation_cache(t.compilation_cache_dir)
    return path, trainer


def use_compilation_cache(path: str | os.PathLike) -> None:
    """JAX's persistent compilation cache in `path` (restarts skip compiling)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = str(Path(path).expanduser().absolute())
    if jax.config.jax_compilation_cache_dir != path:
        cc.reset_cache()
        cc.set_cache_dir(path)


def save_resolved_config(cfg: ExperimentConfig, workdir: AnyPath) -> None:
    """WORKDIR/config.yaml (warns when a resumed run's config differs from the saved one)."""
    if jax.process_index() != 0:
        return
    path = workdir / CONFIG_FILE
    new = cfg.to_dict()
    if path.exists():
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            old = None
        if isinstance(old, dict) and old != new:
            diffs = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s in new for k, v in new[s].items()
                     if old.get(s, {}).get(k) != v]
            log.warning("the config differs from the one saved in %s: %s", path, "; ".join(diffs))
    storage.write_text(path, "# Resolved config of this run (scripts/train.py --config THIS_FILE reruns it)\n"
                       + cfg.to_yaml())


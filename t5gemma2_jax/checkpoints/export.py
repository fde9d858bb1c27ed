"""The params export: a model's parameters and config as one Orbax directory.

    DIR/model_config.json    `T5Gemma2Config.to_dict()`
    DIR/params/              Orbax StandardCheckpointer: {param name: array}

A parameter's name is its NNX path joined by dots (`decoder.stack.blocks.layers.0.attn.q`), the
same names the trainer's state uses, so a training run's export (`WORKDIR/export`), an adapted
Gemma 3 (`scripts/adapt_gemma3.py --format orbax`) and `save_export` all write this one layout,
and `load_export`, `train.init_from` and `scripts/generate.py` read it. Restoring reads each array
straight into its sharding (from the parameter's logical axes on a mesh), so no host holds the
whole model.

`model_config.json` is written last and removed first when an export is overwritten: it is the
export's commit marker (`is_export`), so an export cut off while writing, on a disk or in an
object store, is never taken for a whole one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from t5gemma2_jax import storage
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.checkpoints.triage import KeyTriage
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.model import T5Gemma2
from t5gemma2_jax.sharding import Rules, param_shardings
from t5gemma2_jax.storage import AnyPath

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def param_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: T5Gemma2) -> dict[str, jax.Array]:
    """Every parameter of `model` under its name (concrete or traced)."""
    return {param_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def is_export(directory: str | os.PathLike) -> bool:
    return (storage.as_path(directory) / CONFIG_FILE).is_file()


def save_export(directory: str | os.PathLike, config: T5Gemma2Config, params: dict[str, jax.Array]) -> AnyPath:
    """Write `config` and the flat `params` (see `flat_params`) to `directory`; every process of a
    multi-host job calls it (Orbax writes each array's shards from the hosts that hold them)."""
    directory = storage.absolute(directory)
    if jax.process_index() == 0:
        if storage.is_local(directory):
            directory.mkdir(parents=True, exist_ok=True)
        storage.remove(directory / CONFIG_FILE)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        storage.write_text(directory / CONFIG_FILE, json.dumps(config.to_dict(), indent=1))
    return directory


def read_export_config(directory: str | os.PathLike) -> T5Gemma2Config:
    path = storage.as_path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a params export (no {CONFIG_FILE})")
    try:
        return T5Gemma2Config.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a valid model config ({e})") from None


def load_export_arrays(directory: str | os.PathLike, shapes: dict[str, jax.ShapeDtypeStruct],
                       shardings: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """The exported arrays named in `shapes`, placed with `shardings` (default: first device).
    Entries the export has beyond `shapes` (e.g. a vision tower) stay on disk."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = {n: dev for n in shapes}
    target = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[n]) for n, s in shapes.items()}
    path = storage.absolute(directory) / PARAMS_DIR
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    have = dict(tree) if isinstance(tree, dict) else {n: None for n in shapes}  # no metadata: trust it
    triage = KeyTriage()
    triage.extend("missing parameters", sorted(set(shapes) - set(have)))
    for n in set(shapes) & set(have):
        stored = tuple(getattr(have[n], "shape", shapes[n].shape))
        triage.check_shape(n, stored, stored, shapes[n].shape)
    triage.raise_if_any(f"{directory}: export does not match the model config")
    # Only what is asked for is read: entries beyond it (e.g. a vision tower) stay on disk.
    with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=bool(set(have) - set(shapes))))
    return {n: restored[n] for n in shapes}


def load_export(directory: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules | None = None,
                **overrides) -> T5Gemma2:
    """The `T5Gemma2` of an export; `overrides` set runtime config fields (dtype, remat, ...).

    With a `mesh` the parameters are sharded by the logical-axis rules; otherwise they go to the
    first local device."""
    cfg = read_export_config(directory)
    return model_from_arrays(cfg.replace(**overrides) if overrides else cfg,
                             lambda shapes, shardings: load_export_arrays(directory, shapes, shardings), mesh, rules)


def model_from_arrays(cfg: T5Gemma2Config, read: Callable[[dict, dict | None], dict[str, jax.Array]],
                      mesh: Mesh | None = None, rules: Rules | None = None) -> T5Gemma2:
    """A `T5Gemma2(cfg)` whose parameters are `read(shapes, shardings)` (flat, by `param_name`),
    nothing else allocated: shardings by the logical-axis rules on `mesh`, or None (first device)."""
    abstract = nnx.eval_shape(lambda: T5Gemma2(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = {param_name(p): (p, v) for p, v in nnx.to_flat_state(params)}
    shapes = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, (_, v) in flat.items()}
    shardings = None
    if mesh is not None:
        shardings, _ = param_shardings({n: v for n, (_, v) in flat.items()}, mesh, rules)
    arrays = read(shapes, shardings)
    params = nnx.from_flat_state([(p, v.replace(arrays[n])) for n, (p, v) in flat.items()])
    return nnx.merge(graphdef, params, rest)

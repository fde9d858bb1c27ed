"""The training state: trainable params, frozen params, optimizer state, step and RNG, one pytree.

The parameters are `ModelDef`'s flat dicts. Shardings come from each parameter's `logical_axes`
metadata through the mesh rules (`t5gemma2_jax.sharding.logical_to_spec`); Adam moments take their
parameter's sharding. The state is created by a function jitted with those `out_shardings`, so
every device materialises only its own shards and no host ever holds the full parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.checkpoints.sources import Source, find_source
from t5gemma2_jax.config import ConfigError, T5Gemma2Config
from t5gemma2_jax.modeldef import ModelDef
from t5gemma2_jax.sharding import Rules, axis_rules

TrainState = dict  # {"step": int32[], "params": {...}, "frozen": {...}, "opt_state": ..., "rng": uint32[2]}


# ---------------------------------------------------------------------------------------------
# State creation and shardings.


def state_shardings(abstract_state: TrainState, model_def: ModelDef, mesh: Mesh, rules: Rules) -> TrainState:
    """NamedShardings for every leaf: parameters from their logical axes, optimizer moments from
    the parameter they belong to (matched by name and shape), scalars replicated."""
    by_name = model_def.param_shardings(mesh, rules)
    shapes = {**model_def.shapes("trainable"), **model_def.shapes("frozen")}
    replicated = NamedSharding(mesh, P())

    def for_leaf(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in by_name and tuple(shapes[name].shape) == tuple(leaf.shape):
                return by_name[name]
        return replicated

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


def _rng_data(seed: int, stream: int) -> jax.Array:
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), stream))


def make_init_fn(model_def: ModelDef, tx: optax.GradientTransformation, seed: int) -> Callable[[], TrainState]:
    """A function of no arguments creating the whole state from `seed` (to be jitted)."""
    def init() -> TrainState:
        model = model_def.new_model(nnx.Rngs(params=_rng_data(seed, 0)), seed)
        params, frozen = model_def.split(model)
        return _assemble(params, frozen, tx, seed)
    return init


def _assemble(params, frozen, tx, seed) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen,
            "opt_state": tx.init(params), "rng": _rng_data(seed, 1)}


def abstract_state(model_def: ModelDef, tx, seed: int, mesh: Mesh, rules: Rules) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings attached, the shardings) — nothing is allocated."""
    shapes = jax.eval_shape(make_init_fn(model_def, tx, seed))
    shardings = state_shardings(shapes, model_def, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def init_state(model_def: ModelDef, tx, seed: int, mesh: Mesh, rules: Rules, shardings: TrainState) -> TrainState:
    """Random initialisation, each device computing only its shards."""
    with jax.set_mesh(mesh), axis_rules(rules):
        return jax.jit(make_init_fn(model_def, tx, seed), out_shardings=shardings)()


def state_from_params(model_def: ModelDef, tx, seed: int, params: dict, frozen: dict, mesh: Mesh,
                      shardings: TrainState) -> TrainState:
    """A fresh state (step 0, new optimizer state) around given parameters (fine-tuning)."""
    params = {n: jax.device_put(np.asarray(params[n]), shardings["params"][n]) for n in model_def.trainable}
    frozen = {n: jax.device_put(np.asarray(frozen[n]), shardings["frozen"][n]) for n in model_def.frozen}
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, f: _assemble(p, f, tx, seed),
                     in_shardings=(shardings["params"], shardings["frozen"]), out_shardings=shardings)
        return fn(params, frozen)


def state_from_base(model_def: ModelDef, tx, seed: int, base: dict, mesh: Mesh, rules: Rules,
                    shardings: TrainState) -> TrainState:
    """A fresh state with adapters around a pretrained `base` (every parameter of the plain model,
    placed like `base_def(model_def)`'s): quantised and adapted on the devices that hold it."""
    plain = base_def(model_def)

    def build(base):
        model = model_def.adapt(plain.merge(base, {}), seed)
        params, frozen = model_def.split(model)
        return _assemble(params, frozen, tx, seed)

    with jax.set_mesh(mesh), axis_rules(rules):
        return jax.jit(build, out_shardings=shardings)(base)


def base_def(model_def: ModelDef) -> ModelDef:
    """The plain model of an adapted definition: every parameter in one group, as checkpoints hold it."""
    return ModelDef(model_def.config, freeze_vision=False)


def pretrained_source(path: str | Source, config: T5Gemma2Config) -> Source:
    """The checkpoint `path` names (`checkpoints.sources.find_source`; a `Source` as it is), checked
    to hold a whole model of `config`'s architecture; reads its config, not its weights (what
    `--check` verifies)."""
    src = path if isinstance(path, Source) else find_source(path, what="train.init_from")
    if src.holds_adapters:
        raise CheckpointError(f"{src.path}: a LoRA run's checkpoint holds adapters, not a model; start from "
                              f"its base ({(src.run_config() or {}).get('train', {}).get('init_from')}) or from "
                              "a merged export (load_peft + merge_lora + save_export)")
    _same_architecture(src.model_config(), config, path.path if isinstance(path, Source) else path)
    return src


def load_pretrained(path: str | Source, model_def: ModelDef, shardings: TrainState) -> tuple[dict, dict]:
    """(trainable, frozen) parameter arrays of a training checkpoint (a work directory, its
    `checkpoints/` or one `checkpoints/<step>`: the newest step), a params export or a Hugging
    Face checkpoint, placed with the state's shardings."""
    cfg = model_def.config
    src = pretrained_source(path, cfg)
    shapes = {**model_def.shapes("trainable"), **model_def.shapes("frozen")}
    arrays = src.read_params(cfg, shapes, {**shardings["params"], **shardings["frozen"]})
    return ({n: arrays[n] for n in model_def.trainable}, {n: arrays[n] for n in model_def.frozen})


def _same_architecture(checkpoint: T5Gemma2Config, config: T5Gemma2Config, path) -> None:
    """The last guard: `ExperimentConfig.model_config()` takes the architecture from
    `train.init_from`, so this fails only for another path or a checkpoint changed since."""
    diffs = checkpoint.architecture_differences(config, labels=("checkpoint", "config"))
    if diffs:
        raise ConfigError(f"train.init_from: {path} has a different architecture than the model being "
                          f"trained: " + "; ".join(diffs[:10]))


def count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

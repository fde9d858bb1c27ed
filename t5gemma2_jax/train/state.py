"""The training state: trainable params, frozen params, optimizer state, step and RNG, one pytree.

Parameters are kept as flat dicts `{"encoder.stack.blocks.layers.0.attn.q": array}` (the names are
the NNX paths joined by dots): plain pytrees that optax, Orbax and `jax.jit` shardings handle
directly, and readable in a checkpoint. `ModelDef` turns them back into a `T5Gemma2` inside a traced
function (`model_def.merge(params, frozen)`).

Shardings come from each parameter's `logical_axes` metadata through the mesh rules
(`t5gemma2_jax.sharding.logical_to_spec`); Adam moments take their parameter's sharding. The
state is created by a function jitted with those `out_shardings`, so every device materialises only
its own shards and no host ever holds the full parameters.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5gemma2_jax.adapters import apply_lora, quantize_base
from t5gemma2_jax.checkpoints.export import flat_params, load_export_arrays, param_name
from t5gemma2_jax.checkpoints.hf import load_hf
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.config import ConfigError, T5Gemma2Config
from t5gemma2_jax.model import T5Gemma2
from t5gemma2_jax.sharding import Rules, axis_rules, variable_spec
from t5gemma2_jax.train.checkpoint import load_run_params
from t5gemma2_jax.train.config import LoraConfig, OptimConfig
from t5gemma2_jax.train.sources import Source, find_source

log = logging.getLogger(__name__)

TrainState = dict  # {"step": int32[], "params": {...}, "frozen": {...}, "opt_state": ..., "rng": uint32[2]}


def _nothing(path, x) -> bool:
    return False


class ModelDef:
    """The model's structure without arrays: graph, parameter names, shapes and logical axes, split
    into a trainable and a frozen group: the SigLIP tower frozen when `freeze_vision`, or, with
    adapters (`lora.rank > 0`), everything but the adapters frozen (and the base's text projections
    quantised with `lora.quantize_base`)."""

    def __init__(self, config: T5Gemma2Config, *, freeze_vision: bool = True, lora: LoraConfig | None = None):
        self.config = config
        self.lora = lora if lora is not None and lora.enabled else None
        abstract = nnx.eval_shape(lambda: self.new_model(nnx.Rngs(0)))
        if self.lora is not None:
            trainable, frozen = nnx.LoRAParam, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
        elif config.with_vision and freeze_vision:
            from t5gemma2_jax.vision import TRAINABLE, VISION_PARAMS
            trainable, frozen = TRAINABLE, VISION_PARAMS
        else:
            trainable, frozen = nnx.Param, _nothing
        self.graphdef, tr, fr, rest = nnx.split(abstract, trainable, frozen, ...)
        if jax.tree.leaves(rest):
            names = [param_name(p) for p, _ in nnx.to_flat_state(rest)]
            raise ValueError(f"the model holds non-parameter state the trainer does not handle: {names}")
        self._rest = rest
        self.trainable = {param_name(p): (p, v) for p, v in nnx.to_flat_state(tr)}
        self.frozen = {param_name(p): (p, v) for p, v in nnx.to_flat_state(fr)}

    @property
    def stochastic(self) -> bool:
        """Whether the training forward pass draws random numbers (adapter dropout): the train
        step then gives it a key from the state's RNG."""
        return self.lora is not None and self.lora.dropout > 0

    def adapt(self, model: T5Gemma2, seed: int = 0) -> T5Gemma2:
        """`model` with this definition's quantised base and adapters (in place; works traced)."""
        if self.lora is not None:
            if self.lora.quantize_base != "none":
                quantize_base(model, self.lora.quantize_base)
            apply_lora(model, rank=self.lora.rank, alpha=self.lora.alpha, targets=self.lora.targets or None,
                       dropout=self.lora.dropout, rngs=jax.random.fold_in(jax.random.key(seed), 2),
                       dtype=self.lora.dtype)
        return model

    def new_model(self, rngs: nnx.Rngs, seed: int = 0) -> T5Gemma2:
        return self.adapt(T5Gemma2(self.config, rngs=rngs), seed)

    # -- structure ------------------------------------------------------------------------------
    def shapes(self, group: str = "trainable") -> dict[str, jax.ShapeDtypeStruct]:
        vars_ = self.trainable if group == "trainable" else self.frozen
        return {n: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for n, (_, v) in vars_.items()}

    def param_specs(self, mesh: Mesh, rules: Rules) -> dict[str, P]:
        specs, fell_back = {}, []
        for name, (_, var) in {**self.trainable, **self.frozen}.items():
            specs[name], fb = variable_spec(var, mesh, rules)
            if fb:
                fell_back.append(name)
        if fell_back:
            log.info("%d parameters keep a dimension replicated because the mesh axis does not divide "
                     "it (e.g. %s)", len(fell_back), fell_back[0])
        return specs

    # -- arrays <-> model -----------------------------------------------------------------------
    def merge(self, params: dict, frozen: dict) -> T5Gemma2:
        """A `T5Gemma2` whose parameters are the given arrays (works on tracers)."""
        def state(vars_, arrays):
            return nnx.from_flat_state([(p, v.replace(arrays[n])) for n, (p, v) in vars_.items()])
        return nnx.merge(self.graphdef, state(self.trainable, params), state(self.frozen, frozen), self._rest)

    def split(self, model: T5Gemma2) -> tuple[dict, dict]:
        """(trainable, frozen) flat dicts of a concrete or traced model."""
        flat = flat_params(model)
        missing = sorted((set(self.trainable) | set(self.frozen)) - set(flat))
        if missing:
            raise ValueError(f"model lacks parameters {missing[:5]}...")
        return ({n: flat[n] for n in self.trainable}, {n: flat[n] for n in self.frozen})


# ---------------------------------------------------------------------------------------------
# Optimizer.


def make_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    lr, warm = o.learning_rate, o.warmup_steps
    if o.schedule == "cosine":
        decay = max(o.decay_steps or total_steps, warm + 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, decay, end_value=lr * o.min_lr_ratio)
    if o.schedule == "linear":
        decay = max(o.decay_steps or total_steps, warm + 1)
        parts = [optax.linear_schedule(lr, lr * o.min_lr_ratio, decay - warm)]
        if warm:
            return optax.join_schedules([optax.linear_schedule(0.0, lr, warm)] + parts, [warm])
        return parts[0]
    if o.schedule == "rsqrt":
        ts = float(o.rsqrt_timescale or max(warm, 1))

        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            warmup = lr * step / max(warm, 1)
            return jnp.where(step < warm, warmup, lr * jnp.sqrt(ts / jnp.maximum(step, ts)))
        return rsqrt
    if warm:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    return optax.constant_schedule(lr)


def make_optimizer(o: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay, matrices only unless `decay_vectors`) after global-norm clipping."""
    schedule = make_schedule(o, total_steps)

    def decay_mask(params):
        return jax.tree.map(lambda p: o.decay_vectors or p.ndim >= 2, params)

    adam = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mu_dtype=jnp.dtype(o.mu_dtype), mask=decay_mask)
    # Clipping is always in the chain (at an infinite norm when disabled, which leaves every finite
    # gradient as it is), so the optimizer state has one structure whatever clip_norm is: a run
    # can be resumed with clipping switched on, e.g. after a divergence.
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm if o.clip_norm > 0 else float("inf")), adam)
    return tx, schedule


# ---------------------------------------------------------------------------------------------
# State creation and shardings.


def state_shardings(abstract_state: TrainState, model_def: ModelDef, mesh: Mesh, rules: Rules) -> TrainState:
    """NamedShardings for every leaf: parameters from their logical axes, optimizer moments from
    the parameter they belong to (matched by name and shape), scalars replicated."""
    specs = model_def.param_specs(mesh, rules)
    shapes = {**model_def.shapes("trainable"), **model_def.shapes("frozen")}
    replicated = NamedSharding(mesh, P())

    def for_leaf(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in specs and tuple(shapes[name].shape) == tuple(leaf.shape):
                return NamedSharding(mesh, specs[name])
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


def pretrained_source(path: str, config: T5Gemma2Config) -> Source:
    """The checkpoint `path` names (`train.sources.find_source`), checked to hold a whole model of
    `config`'s architecture; reads its config, not its weights (what `--check` verifies)."""
    src = find_source(path, what="train.init_from")
    if src.holds_adapters:
        raise CheckpointError(f"{src.path}: a LoRA run's checkpoint holds adapters, not a model; start from "
                              f"its base ({(src.run_config() or {}).get('train', {}).get('init_from')}) or from "
                              "a merged export (load_peft + merge_lora + save_export)")
    _same_architecture(src.model_config(), config, path)
    return src


def load_pretrained(path: str, model_def: ModelDef, shardings: TrainState) -> tuple[dict, dict]:
    """(trainable, frozen) parameter arrays of a training checkpoint (a work directory, its
    `checkpoints/` or one `checkpoints/<step>`: the newest step), a params export or a Hugging
    Face checkpoint, placed with the state's shardings."""
    cfg = model_def.config
    src = pretrained_source(path, cfg)
    if src.kind in ("run", "export"):
        shapes = {**model_def.shapes("trainable"), **model_def.shapes("frozen")}
        load = load_run_params if src.kind == "run" else load_export_arrays
        arrays = load(src.path, shapes, {**shardings["params"], **shardings["frozen"]})
    else:
        with jax.default_device(jax.devices("cpu")[0]):  # host memory, not one accelerator
            model = load_hf(src.path, dtype=cfg.dtype, param_dtype=cfg.param_dtype, text_only=not cfg.with_vision,
                            scan_layers=cfg.scan_layers, remat=cfg.remat)
        flat = {n: np.asarray(v) for n, v in flat_params(model).items()}
        del model
        sh = {**shardings["params"], **shardings["frozen"]}
        arrays = {n: jax.device_put(flat.pop(n), sh[n]) for n in list(sh)}
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

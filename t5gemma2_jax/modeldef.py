"""`ModelDef`: a model's structure without arrays, its parameters split into a trainable and a
frozen group, turning flat parameter dicts back into a `T5Gemma2` inside a traced function.

Parameters are kept as flat dicts `{"encoder.stack.blocks.layers.0.attn.q": array}` (the names are
the NNX paths joined by dots): plain pytrees that optax, Orbax and `jax.jit` shardings handle
directly, and readable in a checkpoint. Training (`train.state`) and loading a LoRA run's model
(`loading`) share this definition, so both quantise, adapt and split a model the same way.
"""

from __future__ import annotations

import logging

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from t5gemma2_jax.adapters import apply_lora, quantize_base
from t5gemma2_jax.checkpoints.export import flat_params, param_name
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.experiment import LoraConfig
from t5gemma2_jax.model import T5Gemma2
from t5gemma2_jax.sharding import Rules, param_shardings

log = logging.getLogger(__name__)


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

    def param_shardings(self, mesh: Mesh, rules: Rules) -> dict[str, NamedSharding]:
        """Every parameter's sharding on `mesh` (`sharding.param_shardings`)."""
        shardings, fell_back = param_shardings(
            {name: var for name, (_, var) in {**self.trainable, **self.frozen}.items()}, mesh, rules)
        if fell_back:
            log.info("%d parameters keep a dimension replicated because the mesh axis does not divide "
                     "it (e.g. %s)", len(fell_back), fell_back[0])
        return shardings

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

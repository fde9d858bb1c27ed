"""`Trainer.build(cfg)`: the one place an experiment config becomes a mesh, a model definition, an
optimizer, an abstract train state and the batch shapes, and then compiled steps.

    trainer = Trainer.build(cfg)                 # validated; nothing compiled, nothing allocated
    steps = trainer.compile()                    # train (and eval) step, from abstract batch shapes
    state = trainer.init_state()                 # or trainer.state_from_pretrained(path)
    state, metrics = steps.train(state, trainer.place_batch(next(batches)))

`train()` (the loop), `scripts/aot_compile.py` (the same build on a TPU topology's devices) and
`scripts/benchmark.py` (the same step, timed) all go through it, so what is benchmarked and what
is compiled for a pod is what trains.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5gemma2_jax.checkpoints.export import param_name
from t5gemma2_jax.checkpoints.sources import Source
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.data.pipeline import batch_shapes
from t5gemma2_jax.experiment import ExperimentConfig
from t5gemma2_jax.model import T5Gemma2
from t5gemma2_jax.modeldef import ModelDef
from t5gemma2_jax.parallel import batch_sharding, check_batch, global_batch, make_mesh, sharding_rules
from t5gemma2_jax.sharding import Rules, axis_rules
from t5gemma2_jax.train import flops as flops_lib
from t5gemma2_jax.train.checkpoint import state_bytes
from t5gemma2_jax.train.optim import make_optimizer
from t5gemma2_jax.train.state import (TrainState, abstract_state, base_def, init_state, load_pretrained,
                                      state_from_base, state_from_params)
from t5gemma2_jax.train.step import CompiledParts, CompiledSteps


@dataclasses.dataclass(frozen=True)
class Trainer:
    cfg: ExperimentConfig
    mesh: Mesh
    rules: Rules
    model_config: T5Gemma2Config
    model_def: ModelDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState        # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    batch_shapes: dict[str, jax.ShapeDtypeStruct]   # the global batch, split over the batch axes

    @classmethod
    def build(cls, cfg: ExperimentConfig, *, devices: Sequence | None = None) -> "Trainer":
        """Raises ConfigError / SetupError naming the problem when the config does not fit the
        devices (default: all of them; a TPU topology's for ahead-of-time compilation)."""
        mesh = make_mesh(cfg.mesh, devices)
        check_batch(cfg.data.batch_size, mesh, cfg.train.microbatches, jax.process_count())
        rules = sharding_rules(cfg.mesh)
        model_config = cfg.model_config()
        model_def = ModelDef(model_config, freeze_vision=cfg.train.freeze_vision, lora=cfg.lora)
        tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
        abstract, shardings = abstract_state(model_def, tx, cfg.train.seed, mesh, rules)
        shapes = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
                  for k, (shape, dtype) in batch_shapes(cfg.data).items()}
        return cls(cfg=cfg, mesh=mesh, rules=rules, model_config=model_config, model_def=model_def, tx=tx,
                   schedule=schedule, abstract_state=abstract, state_shardings=shardings, batch_shapes=shapes)

    # -- programs ---------------------------------------------------------------------------------
    def compile(self, *, with_eval: bool | None = None) -> CompiledSteps:
        """The train step (donating the state) and, with `with_eval` (default: when the config
        evaluates), the eval step, compiled for `batch_shapes`."""
        t = self.cfg.train
        return CompiledSteps(self.model_def, self.tx, self.schedule, self.mesh, self.rules, self.abstract_state,
                             self.state_shardings, self.batch_shapes, z_loss=t.z_loss, microbatches=t.microbatches,
                             with_eval=(t.eval_every > 0 or t.evaluates_at_start) if with_eval is None else with_eval)

    def compile_parts(self) -> CompiledParts:
        """The train step's forward, forward + backward and optimizer update as three programs,
        for timing them apart (`scripts/benchmark.py --breakdown`)."""
        t = self.cfg.train
        return CompiledParts(self.model_def, self.tx, self.mesh, self.rules, self.abstract_state,
                             self.state_shardings, self.batch_shapes, z_loss=t.z_loss, microbatches=t.microbatches)

    def compile_decode(self, max_new_tokens: int | None = None):
        """Encode + init the cache + one decode step, batch and encoder length of the training data,
        parameters sharded like the train state (no remat): what generation at these shapes costs."""
        d = self.cfg.data
        N = max_new_tokens or d.decoder_length
        cfg = self.model_config.replace(remat="none")
        shardings = self.model_def.param_shardings(self.mesh, self.rules)
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: T5Gemma2(cfg, rngs=nnx.Rngs(0))),
                                               nnx.Param, ...)
            abstract = nnx.from_flat_state([
                (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[param_name(p)])))
                for p, v in nnx.to_flat_state(params)])

            def first_step(params, ids):
                model = nnx.merge(graphdef, params, rest)
                enc, seg = model.encode(ids)
                cache = model.init_cache(enc, seg, N)
                logits, _ = model.decode_step(jnp.full((ids.shape[0],), cfg.bos_token_id, jnp.int32), cache)
                return logits

            ids = jax.ShapeDtypeStruct((d.batch_size, d.encoder_length), jnp.int32,
                                       sharding=NamedSharding(self.mesh, P(("data", "fsdp"))))
            return jax.jit(first_step).lower(abstract, ids).compile()

    # -- states and batches -----------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """A randomly initialised state, each device computing only its shards."""
        return init_state(self.model_def, self.tx, self.cfg.train.seed, self.mesh, self.rules, self.state_shardings)

    def state_from_pretrained(self, path: str | Source) -> TrainState:
        """Step 0 and a fresh optimizer around the parameters of a params export or an HF directory
        (with adapters: that checkpoint as the frozen base, adapters fresh)."""
        seed = self.cfg.train.seed
        if self.model_def.lora is None:
            params, frozen = load_pretrained(path, self.model_def, self.state_shardings)
            return state_from_params(self.model_def, self.tx, seed, params, frozen, self.mesh, self.state_shardings)
        plain = base_def(self.model_def)
        base, _ = load_pretrained(path, plain, {"params": plain.param_shardings(self.mesh, self.rules), "frozen": {}})
        return state_from_base(self.model_def, self.tx, seed, base, self.mesh, self.rules, self.state_shardings)

    def fresh_state(self) -> TrainState:
        """The starting state: from `train.init_from`, else random."""
        t = self.cfg.train
        return self.state_from_pretrained(self.cfg.init_source) if t.init_from else self.init_state()

    # -- what checkpoints hold ----------------------------------------------------------------------
    @property
    def saves_base(self) -> bool:
        """Whether checkpoints hold the frozen parameters. With adapters they do not: the base is
        most of the model and never changes, so a checkpoint is the adapters, their optimizer state
        and a checksum of the base, which comes again from `train.init_from` (or the seed)."""
        return self.model_def.lora is None

    def checkpointed(self, state: TrainState) -> TrainState:
        return state if self.saves_base else {k: v for k, v in state.items() if k != "frozen"}

    def state_sizes(self) -> dict[str, int]:
        """Bytes of the whole training state, of what a checkpoint holds, and of the trained
        parameters (logical sizes: every chip holds its share of each)."""
        s = self.abstract_state
        return dict(state=state_bytes(s), checkpoint=state_bytes(self.checkpointed(s)), trainable=state_bytes(s["params"]))

    def place_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process' rows -> the global batch the compiled steps take; a batch of other keys,
        shapes or dtypes is refused naming the difference (the steps were compiled for one)."""
        rows = jax.process_count()
        want = {k: ((s.shape[0] // rows,) + s.shape[1:], s.dtype) for k, s in self.batch_shapes.items()}
        have = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in local.items()}
        if have != want:
            diff = sorted(f"{k}: got {have.get(k)}, expected {want.get(k)}" for k in set(want) | set(have)
                          if have.get(k) != want.get(k))
            raise ValueError("batch does not match the data config the steps were compiled for: " + "; ".join(diff))
        return global_batch(local, self.mesh)

    def step_flops(self, *, all_keys: bool = False) -> flops_lib.StepFlops:
        """The analytic FLOPs of one step at the data config's shapes (`all_keys`: attention the
        way the dense backend computes it, masked scores included)."""
        d, m = self.cfg.data, self.model_config
        return flops_lib.step_flops(m, batch=d.batch_size, encoder_length=d.encoder_length,
                                    decoder_length=d.decoder_length,
                                    images_per_row=d.max_images_per_row if m.with_vision else 0,
                                    vision_trainable=not self.cfg.train.freeze_vision and self.saves_base,
                                    all_keys=all_keys, text_trainable=self.saves_base)

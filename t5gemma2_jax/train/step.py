"""The train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

Loss: token cross-entropy in float32 over `decoder_loss_weights` (+ optional z-loss), summed
over the whole global batch and divided by the total weight, so gradient accumulation over
`microbatches` (a `lax.scan` summing losses, weights and gradients) equals one big batch. Only the
trainable parameters are differentiated; frozen ones (the SigLIP tower) are constants.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5gemma2_jax.losses import batch_loss_sums
from t5gemma2_jax.modeldef import ModelDef
from t5gemma2_jax.ops.rng import dropout_key
from t5gemma2_jax.parallel import BATCH_AXES, batch_sharding
from t5gemma2_jax.sharding import Rules, axis_rules
from t5gemma2_jax.train.state import TrainState


def loss_sums(model_def: ModelDef, params: dict, frozen: dict, batch: Mapping[str, jax.Array],
              z_loss: float = 0.0, dropout_rng: jax.Array | None = None
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(sum of token losses incl. z-loss, (sum of cross-entropy, sum of weights)) of a batch;
    `dropout_rng` drives the model's dropout (adapters'), none without it."""
    with dropout_key(dropout_rng):
        return _loss_sums(model_def, params, frozen, batch, z_loss)


def _loss_sums(model_def, params, frozen, batch, z_loss):
    return batch_loss_sums(model_def.merge(params, frozen), batch, z_loss)


def loss_and_grads(model_def: ModelDef, params: dict, frozen: dict, batch: Mapping[str, jax.Array], *,
                   z_loss: float = 0.0, microbatches: int = 1, dropout_rng: jax.Array | None = None):
    """Mean loss over the batch's weighted tokens and its gradient w.r.t. `params`.

    The batch's total weight is known before the forward pass, so what is differentiated is each
    micro-batch's loss sum already divided by it: the gradients come out as means with no pass of
    their own over every parameter (at 270m-270m the tied table alone is 671 MB).

    Returns (loss incl. z-loss, cross-entropy, token count, grads)."""
    denom = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)

    def mean_loss(params, frozen, mb, dropout_rng):
        total, (ce, count) = loss_sums(model_def, params, frozen, mb, z_loss, dropout_rng)
        return total / denom, (ce / denom, count)

    grad_fn = jax.value_and_grad(mean_loss, has_aux=True)
    if microbatches == 1:
        (loss, (ce, count)), grads = grad_fn(params, frozen, batch, dropout_rng)
        return loss, ce, count, grads
    A = microbatches

    def split(x):  # row j*A + i -> micro-batch i: every micro-batch spans all batch shards
        x = x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1)
        if jax.sharding.get_abstract_mesh().empty:
            return x
        return jax.lax.with_sharding_constraint(x, P(None, BATCH_AXES))

    def body(carry, xs):
        i, mb = xs
        key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        (t, (c, n)), g = grad_fn(params, frozen, mb, key)
        return jax.tree.map(jnp.add, carry, (t, c, n, g)), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, zero, jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss, ce, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(A), jax.tree.map(split, dict(batch))))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, ce, count, grads


def apply_update(tx: optax.GradientTransformation, state: TrainState, grads: dict, loss: jax.Array,
                 rng: jax.Array) -> tuple[TrainState, jax.Array, jax.Array]:
    """(the state after one optimizer step on `grads`, the gradient's global norm, whether the step
    was applied); `rng` is the state's next key.

    A step whose loss or gradient is not finite is not applied: the state stays the last good one,
    so nothing non-finite is ever checkpointed or exported. The loop counts these steps and stops a
    run that keeps producing them (train.max_nonfinite_steps). The decision is taken before the
    update (from a finite state, AdamW's result is finite when the gradient is), so the update is
    a branch of its own: the optimizer writes each parameter and its moments once, in place into
    the donated state, and no second copy of the state is kept to select from."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "frozen": state["frozen"], "opt_state": opt_state, "rng": jax.random.key_data(rng)}

    return jax.lax.cond(finite, update, lambda state: state, state), grad_norm, finite


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, z_loss: float = 0.0, microbatches: int = 1) -> Callable:
    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        loss, ce, count, grads = loss_and_grads(model_def, state["params"], state["frozen"], batch, z_loss=z_loss,
                                                microbatches=microbatches,
                                                dropout_rng=step_rng if model_def.stochastic else None)
        new_state, grad_norm, finite = apply_update(tx, state, grads, loss, rng)
        metrics = {"loss": ce, "loss_with_z": loss, "tokens": count, "grad_norm": grad_norm,
                   "param_norm": optax.tree.norm(new_state["params"]),
                   "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
                   "nonfinite": (~finite).astype(jnp.int32)}
        return new_state, metrics
    return train_step


def make_eval_step(model_def: ModelDef) -> Callable:
    def eval_step(state: TrainState, batch) -> dict:
        _, (ce, count) = loss_sums(model_def, state["params"], state["frozen"], batch)
        return {"loss_sum": ce, "tokens": count}
    return eval_step


class CompiledSteps:
    """Ahead-of-time compiled train and eval steps for one mesh and one batch shape.

    Tracing happens under `jax.set_mesh(mesh)` and the sharding rules, so the model's activation
    constraints apply. The train step donates the state."""

    def __init__(self, model_def: ModelDef, tx, schedule, mesh: Mesh, rules: Rules,
                 abstract_state: TrainState, state_shardings: TrainState, batch: Mapping[str, jax.Array],
                 *, z_loss: float = 0.0, microbatches: int = 1, with_eval: bool = True):
        self.mesh = mesh
        batch_sh = {k: batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
        replicated = NamedSharding(mesh, P())
        train = jax.jit(make_train_step(model_def, tx, schedule, z_loss=z_loss, microbatches=microbatches),
                        in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, replicated),
                        donate_argnums=0)
        with jax.set_mesh(mesh), axis_rules(rules):
            self.train_lowered = train.lower(abstract_state, abstract_batch)
            self.train = self.train_lowered.compile()
            self.eval = None
            if with_eval:
                ev = jax.jit(make_eval_step(model_def), in_shardings=(state_shardings, batch_sh),
                             out_shardings=replicated)
                self.eval = ev.lower(abstract_state, abstract_batch).compile()


class CompiledParts:
    """The train step's three parts compiled one by one, with the train step's shardings, to time
    them apart (`scripts/benchmark.py --breakdown`):

        forward(state, batch) -> loss                    forward pass and loss
        gradient(state, batch) -> (loss, grads)          forward and backward (`loss_and_grads`)
        update(state, grads, loss) -> state              the optimizer step (`apply_update`), donating the state

    `gradient` then `update` is what `train` computes in one program."""

    def __init__(self, model_def: ModelDef, tx, mesh: Mesh, rules: Rules, abstract_state: TrainState,
                 state_shardings: TrainState, batch: Mapping[str, jax.Array], *, z_loss: float = 0.0,
                 microbatches: int = 1):
        batch_sh = {k: batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
        replicated = NamedSharding(mesh, P())
        grads_sh = state_shardings["params"]
        abstract_grads = abstract_state["params"]

        def forward(state, batch):
            total, (_, count) = loss_sums(model_def, state["params"], state["frozen"], batch, z_loss)
            return total / jnp.maximum(count, 1.0)

        def gradient(state, batch):
            loss, _, _, grads = loss_and_grads(model_def, state["params"], state["frozen"], batch, z_loss=z_loss,
                                               microbatches=microbatches)
            return loss, grads

        def update(state, grads, loss):
            rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
            return apply_update(tx, state, grads, loss, rng)[0]

        with jax.set_mesh(mesh), axis_rules(rules):
            self.forward = jax.jit(forward, in_shardings=(state_shardings, batch_sh), out_shardings=replicated
                                   ).lower(abstract_state, abstract_batch).compile()
            self.gradient = jax.jit(gradient, in_shardings=(state_shardings, batch_sh),
                                    out_shardings=(replicated, grads_sh)).lower(abstract_state, abstract_batch).compile()
            loss = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
            self.update = jax.jit(update, in_shardings=(state_shardings, grads_sh, replicated),
                                  out_shardings=state_shardings, donate_argnums=0
                                  ).lower(abstract_state, abstract_grads, loss).compile()

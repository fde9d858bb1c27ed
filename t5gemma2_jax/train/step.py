"""The train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

Loss: token cross-entropy in float32 over `decoder_loss_weights` (+ optional z-loss), summed
over the whole global batch and divided by the total weight, so gradient accumulation over
`microbatches` (a `lax.scan` summing losses, weights and gradients) equals one big batch. Only the
trainable parameters are differentiated; frozen ones (the SigLIP tower) are constants.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5gemma2_jax.losses import cross_entropy
from t5gemma2_jax.nn.rng import dropout_key
from t5gemma2_jax.sharding import Rules, axis_rules
from t5gemma2_jax.train.mesh import BATCH_AXES, batch_sharding
from t5gemma2_jax.train.state import ModelDef, TrainState


def loss_sums(model_def: ModelDef, params: dict, frozen: dict, batch: Mapping[str, jax.Array],
              z_loss: float = 0.0, dropout_rng: jax.Array | None = None
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(sum of token losses incl. z-loss, (sum of cross-entropy, sum of weights)) of a batch;
    `dropout_rng` drives the model's dropout (adapters'), none without it."""
    with dropout_key(dropout_rng):
        return _loss_sums(model_def, params, frozen, batch, z_loss)


def _loss_sums(model_def, params, frozen, batch, z_loss):
    return batch_loss_sums(model_def.merge(params, frozen), batch, z_loss)


def batch_loss_sums(model, batch: Mapping[str, jax.Array], z_loss: float = 0.0
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(sum of token losses incl. z-loss, (sum of cross-entropy, sum of weights)) of a packed
    batch under `model`: the one teacher-forced loss of training, its evaluation and
    `scripts/evaluate.py`."""
    images = {}
    if model.config.with_vision and "pixel_values" in batch:
        images = dict(pixel_values=batch["pixel_values"], image_mask=batch.get("image_mask"))
    logits = model(batch["encoder_input_ids"], batch["decoder_input_ids"],
                   encoder_segment_ids=batch["encoder_segment_ids"],
                   decoder_segment_ids=batch["decoder_segment_ids"],
                   encoder_positions=batch["encoder_positions"],
                   decoder_positions=batch["decoder_positions"], **images).logits
    targets, weights = batch["decoder_target_ids"], batch["decoder_loss_weights"]
    total, count = cross_entropy(logits, targets, weights, z_loss)
    ce = cross_entropy(logits, targets, weights)[0] if z_loss else total
    return total, (ce, count)


def loss_and_grads(model_def: ModelDef, params: dict, frozen: dict, batch: Mapping[str, jax.Array], *,
                   z_loss: float = 0.0, microbatches: int = 1, dropout_rng: jax.Array | None = None):
    """Mean loss over the batch's weighted tokens and its gradient w.r.t. `params`.

    Returns (loss incl. z-loss, cross-entropy, token count, grads)."""
    grad_fn = jax.value_and_grad(partial(loss_sums, model_def, z_loss=z_loss), has_aux=True)
    if microbatches == 1:
        (total, (ce, count)), grads = grad_fn(params, frozen, batch, dropout_rng=dropout_rng)
    else:
        A = microbatches

        def split(x):  # row j*A + i -> micro-batch i: every micro-batch spans all batch shards
            x = x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1)
            if jax.sharding.get_abstract_mesh().empty:
                return x
            return jax.lax.with_sharding_constraint(x, P(None, BATCH_AXES))

        def body(carry, xs):
            i, mb = xs
            key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            (t, (c, n)), g = grad_fn(params, frozen, mb, dropout_rng=key)
            return jax.tree.map(jnp.add, carry, (t, c, n, g)), None

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, zero, jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (total, ce, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(A), jax.tree.map(split, dict(batch))))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return total / denom, ce / denom, count, grads


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, z_loss: float = 0.0, microbatches: int = 1) -> Callable:
    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        params = state["params"]
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        loss, ce, count, grads = loss_and_grads(model_def, params, state["frozen"], batch, z_loss=z_loss,
                                                microbatches=microbatches,
                                                dropout_rng=step_rng if model_def.stochastic else None)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "frozen": state["frozen"],
                     "opt_state": opt_state, "rng": jax.random.key_data(rng)}
        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(new_params)
        # A step whose loss, gradient or result is not finite is not applied: the state stays the
        # last good one, so nothing non-finite is ever checkpointed or exported. The loop counts
        # these steps and stops a run that keeps producing them (train.max_nonfinite_steps).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {"loss": ce, "loss_with_z": loss, "tokens": count, "grad_norm": grad_norm,
                   "param_norm": param_norm, "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
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

"""The optimizer: AdamW after global-norm clipping, and the learning-rate schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from t5gemma2_jax.experiment import OptimConfig


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

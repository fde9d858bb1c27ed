"""Small shared pieces of the SigLIP tower: initialisers and the affine LayerNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

def normal(key: jax.Array, shape: tuple[int, ...], stddev: float, dtype: jnp.dtype) -> jax.Array:
    return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def fan_in_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: jnp.dtype) -> jax.Array:
    """LeCun normal: std 1/sqrt(fan_in). (Real weights always come from a checkpoint.)"""
    return normal(key, shape, fan_in ** -0.5, dtype)


class LayerNorm(nnx.Module):
    """SigLIP's standard affine LayerNorm (scale init 1, bias 0 — not Gemma's 1+w form).

    Mean and variance are taken in float32 whatever the compute dtype; the result is cast back.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype,
                 logical_axes: tuple[str | None, ...] = ("vision_embed",)):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=logical_axes)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=logical_axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)  # biased, as torch
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)

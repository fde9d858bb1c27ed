"""Low-rank adapters (LoRA) of a projection kernel.

An adapter adds `(x . A) . B * alpha / rank` to its kernel's projection (`nn/project`), where the
kernel's leading `in_dims` axes are the ones `x` contracts (its trailing axes), A is `[*in, rank]`
and B `[rank, *out]`. That is PEFT's LoRA on the matching `nn.Linear`, with `lora_A.weight = A.T`
and `lora_B.weight = B.T` once the dims are flattened in the same order, and B starts at zero so an
adapted model equals its base. Adapters are `nnx.LoRAParam`s, so `nnx.state(model, nnx.LoRAParam)`
is exactly what fine-tuning trains; `t5gemma2_jax.adapters` adds and folds them.

Dropout on the adapter's input (PEFT's `lora_dropout`) draws from the key the train step gives the
forward pass (`ops.rng`), folded with the adapter's name.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.ops.rng import current_dropout_key


class LoRA(nnx.Module):
    """A low-rank update `[*in] -> rank -> [*out]` of one kernel (see the module docstring)."""

    def __init__(self, a: jax.Array, b: jax.Array, *, in_dims: int, alpha: float, dropout: float,
                 axes_a: tuple, axes_b: tuple, name: str):
        self.a = nnx.LoRAParam(a, logical_axes=axes_a)
        self.b = nnx.LoRAParam(b, logical_axes=axes_b)
        self.in_dims = in_dims
        self.rank = int(a.shape[-1])
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self._salt = zlib.crc32(name.encode())   # a fixed per-site stream of the dropout key

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        key = current_dropout_key()
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self._salt), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        # x's trailing `in_dims` axes contract with A's leading ones, then rank with B's first.
        h = jnp.tensordot(x, self.a[...].astype(dtype), axes=self.in_dims)
        return jnp.tensordot(h, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """The update of the kernel itself, `A . B * scale` in float32, shaped like the kernel
        (each layer's own when the adapter is stacked over a scanned block's layers)."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        one = lambda a, b: jnp.tensordot(a, b, axes=1) * self.scale  # noqa: E731
        return jax.vmap(one)(a, b) if a.ndim == self.in_dims + 2 else one(a, b)

"""The one embedding table shared by encoder input, decoder input and the LM head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.nn.cpu_matmul import flattens_tokens
from t5gemma2_jax.sharding import constrain


class Embedder(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, eoi_token_id: int, param_dtype, dtype,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.table = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype),
                               logical_axes=("vocab", "embed"))
        # A learned vector that replaces <end_of_image>'s row (unscaled) in both towers.
        self.eoi = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("embed",))
        self.eoi_token_id = eoi_token_id
        self.dtype = dtype
        self.dim = dim

    def encode(self, ids: jax.Array) -> jax.Array:
        """`[B, T]` ids -> `[B, T, D]` embeddings · sqrt(D) in the compute dtype."""
        table = self.table[...]
        # sqrt(D) is rounded to the parameter dtype (e.g. 25.25 for D=640 in bf16), as Gemma does.
        scale = jnp.asarray(math.sqrt(self.dim), table.dtype)
        x = jnp.take(table, ids, axis=0) * scale
        x = jnp.where((ids == self.eoi_token_id)[..., None], self.eoi[...].astype(x.dtype), x)
        return constrain(x.astype(self.dtype), ("batch", "length", "embed"))

    def decode(self, x: jax.Array) -> jax.Array:
        """Tied LM head: `[B, T, D] -> [B, T, V]` logits in the compute dtype."""
        table = self.table[...].astype(self.dtype)
        if flattens_tokens() and x.ndim == 3:
            # One 2-D matmul over the flattened tokens (see `nn.cpu_matmul.token_matmul`): XLA:CPU
            # otherwise copies the [B, T, V] logits' gradient transposed to form the table's.
            B, T, D = x.shape
            logits = jax.lax.dot_general(x.reshape(B * T, D), table, (((1,), (1,)), ((), ())))
            logits = logits.reshape(B, T, -1)
        else:
            logits = jnp.einsum("BTD,VD->BTV", x, table)
        return constrain(logits, ("batch", "length", "vocab"))

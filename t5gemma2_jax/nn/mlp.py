"""GeGLU feed-forward: down(gelu_tanh(x @ gate) * (x @ up))."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5gemma2_jax.nn.lora import project
from t5gemma2_jax.sharding import constrain


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, param_dtype, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.gate = nnx.Param(init(rngs.params(), (dim, hidden), param_dtype), logical_axes=("embed", "mlp"))
        self.up = nnx.Param(init(rngs.params(), (dim, hidden), param_dtype), logical_axes=("embed", "mlp"))
        self.down = nnx.Param(init(rngs.params(), (hidden, dim), param_dtype), logical_axes=("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(self, "gate", "BTD,DF->BTF", x, self.dtype)
        up = project(self, "up", "BTD,DF->BTF", x, self.dtype)
        h = jax.nn.gelu(gate, approximate=True) * up
        h = checkpoint_name(constrain(h, ("batch", "length", "mlp")), "mlp_hidden")
        out = project(self, "down", "BTF,FD->BTD", h, self.dtype)
        return checkpoint_name(out, "mlp_out")

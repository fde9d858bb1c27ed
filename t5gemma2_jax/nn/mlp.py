"""GeGLU feed-forward: down(gelu_tanh(x @ gate) * (x @ up))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5gemma2_jax.nn.project import project
from t5gemma2_jax.sharding import constrain


_C = float(np.sqrt(2.0 / np.pi))


@jax.custom_vjp
def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`gelu_tanh(gate) * up`, differentiated from `gate` and `up` alone: autodiff of the tanh
    form keeps six intermediates per element for the backward (stacked per scanned layer), this
    keeps the two inputs and recomputes the tanh."""
    return jax.nn.gelu(gate, approximate=True) * up


def _geglu_fwd(gate, up):
    return geglu(gate, up), (gate, up)


def _geglu_bwd(res, dh):
    g, u = res
    t = jnp.tanh(_C * (g + 0.044715 * (g * g * g)))
    cdf = 0.5 * (1.0 + t)
    dgelu = cdf + 0.5 * g * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * (g * g))
    return (dh * u * dgelu).astype(g.dtype), (dh * (g * cdf)).astype(u.dtype)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


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
        h = geglu(gate, up)
        h = checkpoint_name(constrain(h, ("batch", "length", "mlp")), "mlp_hidden")
        out = project(self, "down", "BTF,FD->BTD", h, self.dtype)
        return checkpoint_name(out, "mlp_out")

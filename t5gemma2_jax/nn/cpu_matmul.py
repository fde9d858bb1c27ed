"""CPU tuning of projections: each one as a single 2-D matmul over flattened tokens.

Only XLA:CPU needs this (`token_matmul` says why); on TPU and GPU, and with the sequence split
over devices, every projection stays the einsum it is written as.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from t5gemma2_jax.ops.backends import target_platform
from t5gemma2_jax.sharding import sequence_axis


@functools.lru_cache(maxsize=None)
def _split_equation(equation: str) -> tuple[int, int] | None:
    """(leading free axes of x, contracted axes) of `<lead><in>,<in><out>-><lead><out>`, else None."""
    ins, out = equation.replace(" ", "").split("->")
    a, b = ins.split(",")
    contracted = [c for c in a if c in b and c not in out]
    n = len(a) - len(contracted)
    if not contracted or a[n:] != "".join(contracted) or not b.startswith(a[n:]) or out != a[:n] + b[len(contracted):]:
        return None
    return n, len(contracted)


def flattens_tokens() -> bool:
    """Whether projections run over flattened tokens here (see `token_matmul`)."""
    return target_platform() == "cpu" and sequence_axis() is None


def token_matmul(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(equation, x, w)` for an equation `<lead><in>,<in><out>-><lead><out>` (x's leading axes
    free, its trailing ones contracted with w's leading ones), as one 2-D matmul
    `[tokens, in] @ [in, out]` when compiling for CPU and the sequence is not split over devices.

    XLA:CPU lowers a dot that contracts several axes (the weight gradient of `BTD,DF->BTF`
    contracts B and T) by copying a transposed operand first, a strided pass that cost the 270m
    train step's backward about as much as its matmuls; over flattened tokens there is nothing to
    transpose. The backward keeps `x` itself, not its flattened copy, so projections of one input
    (q, k and v; gate and up; k and v of the encoder states in every decoder layer) share one
    saved activation, and a scanned stack does not stack a copy of a loop-invariant input per
    layer. Elsewhere (TPU, GPU, or a sequence split over `context`, where merging B and T would not
    keep the split) the einsum is left as written."""
    split = _split_equation(equation)
    if split is None or split[0] < 2 or not flattens_tokens():
        return jnp.einsum(equation, x, w)
    return _flat_matmul(x, w, split[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _flat_matmul(x: jax.Array, w: jax.Array, k: int) -> jax.Array:
    """x `[*lead, *in]` @ w `[*in, *out]` (`k` = len(in)) as one 2-D matmul."""
    inner = math.prod(w.shape[:k])
    y = jnp.dot(x.reshape(-1, inner), w.reshape(inner, -1))
    return y.reshape(*x.shape[:x.ndim - k], *w.shape[k:])


def _flat_matmul_fwd(x, w, k):
    return _flat_matmul(x, w, k), (x, w)


def _flat_matmul_bwd(k, res, ct):
    x, w = res
    inner = math.prod(w.shape[:k])
    x2, w2, ct2 = x.reshape(-1, inner), w.reshape(inner, -1), ct.reshape(-1, w.size // inner)
    dx = jax.lax.dot_general(ct2, w2, (((1,), (1,)), ((), ())))
    dw = jax.lax.dot_general(x2, ct2, (((0,), (0,)), ((), ())))
    return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_flat_matmul.defvjp(_flat_matmul_fwd, _flat_matmul_bwd)

"""The one place a projection kernel is applied, with its optional low-rank adapter (LoRA).

Every projection of the model (attention q/k/v/o, the GeGLU MLP, the SigLIP tower's projections,
the multimodal projector) computes

    y = einsum(equation, x, W)                       W = module.<name>, dequantised if stored quantised
      + (x . A) . B * alpha / rank                   when module.<name>_lora holds an adapter

where the kernel's leading `in_dims` axes are the ones `x` contracts (its trailing axes), A is
`[*in, rank]` and B `[rank, *out]`. That is PEFT's LoRA on the matching `nn.Linear`, with
`lora_A.weight = A.T` and `lora_B.weight = B.T` once the dims are flattened in the same order, and
B starts at zero so an adapted model equals its base. Adapters are `nnx.LoRAParam`s, so
`nnx.state(model, nnx.LoRAParam)` is exactly what fine-tuning trains; `t5gemma2_jax.adapters`
adds and folds them.

Dropout on the adapter's input (PEFT's `lora_dropout`) draws from the key the train step gives the
forward pass (`ops.rng`), folded with the adapter's name.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.nn.quant import QuantizedKernel
from t5gemma2_jax.ops.backends import target_platform
from t5gemma2_jax.ops.rng import current_dropout_key
from t5gemma2_jax.sharding import sequence_axis

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


def kernel(module: nnx.Module, name: str) -> jax.Array:
    """The value of kernel `name` of `module`, dequantised when it is stored quantised."""
    w = getattr(module, name)
    return w.dequantize() if isinstance(w, QuantizedKernel) else w[...]


def project(module: nnx.Module, name: str, equation: str, x: jax.Array, dtype) -> jax.Array:
    """`einsum(equation, x, module.<name>)` plus the kernel's adapter when it has one."""
    y = token_matmul(equation, x, kernel(module, name).astype(dtype))
    lora = getattr(module, f"{name}_lora", None)
    return y if lora is None else y + lora(x, dtype).astype(y.dtype)

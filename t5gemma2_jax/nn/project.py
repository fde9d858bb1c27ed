"""The one place a projection kernel is applied.

Every projection of the model (attention q/k/v/o, the GeGLU MLP, the SigLIP tower's projections,
the multimodal projector) computes

    y = einsum(equation, x, W)                       W = module.<name>, dequantised if stored quantised
      + module.<name>_lora(x)                        when the kernel has a low-rank adapter (`nn/lora`)

so quantisation (`nn/quant`), adapters and the CPU matmul layout (`nn/cpu_matmul`) each apply to
every projection at once.
"""

from __future__ import annotations

import jax
from flax import nnx

from t5gemma2_jax.nn.cpu_matmul import token_matmul
from t5gemma2_jax.nn.quant import QuantizedKernel


def kernel(module: nnx.Module, name: str) -> jax.Array:
    """The value of kernel `name` of `module`, dequantised when it is stored quantised."""
    w = getattr(module, name)
    return w.dequantize() if isinstance(w, QuantizedKernel) else w[...]


def project(module: nnx.Module, name: str, equation: str, x: jax.Array, dtype) -> jax.Array:
    """`einsum(equation, x, module.<name>)` plus the kernel's adapter when it has one."""
    y = token_matmul(equation, x, kernel(module, name).astype(dtype))
    lora = getattr(module, f"{name}_lora", None)
    return y if lora is None else y + lora(x, dtype).astype(y.dtype)

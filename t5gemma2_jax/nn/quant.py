"""Frozen kernels stored quantised (QLoRA's base model): int8 per channel, or 4-bit NormalFloat.

A `QuantizedKernel` replaces a projection's `nnx.Param` in a model whose base weights do not
train, and dequantises where the kernel is applied (`nn.project.kernel`), so the weights sit in
memory at a quarter (int8) or an eighth (nf4) of their float32 size while adapters train in full
precision.

- `int8`: symmetric, one scale per output channel (absmax over the contracted axes / 127).
- `nf4`: QLoRA's 4-bit NormalFloat: 16 levels at the quantiles of a normal distribution, one
  absmax scale per block of `NF4_BLOCK` consecutive rows of the first (contracted) axis. Codes are
  packed two to a `uint8` along the last axis: XLA's `uint4` arrays take a sub-byte layout that
  an array made by one jitted function does not always have when another, compiled ahead of time,
  receives it (the CPU backend refuses the call), while bytes are the same on every backend.

Scales keep the kernel's logical axes (a scale axis that its mesh axis does not divide stays
replicated), so a quantised base shards like the float one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QUANTIZATIONS = ("int8", "nf4")
NF4_BLOCK = 64
# The 16 NormalFloat levels (Dettmers et al., 2023, appendix E), in [-1, 1].
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


class QuantizedKernel(nnx.Module):
    """A frozen kernel as integer codes and float scales; `dequantize()` gives the float kernel.

    `in_dims` leading axes (after a stacked 'layers' axis, when `stacked`) are the contracted ones."""

    def __init__(self, w: jax.Array, *, method: str, in_dims: int, stacked: bool, logical_axes: tuple | None,
                 dtype):
        if method not in QUANTIZATIONS:
            raise ValueError(f"quantize_base: {method!r} not in {QUANTIZATIONS}")
        self.method, self.in_dims, self.stacked = method, in_dims, stacked
        self.dtype = jnp.dtype(dtype)
        self.shape = tuple(w.shape)
        axes = tuple(logical_axes) if logical_axes is not None else (None,) * w.ndim
        lead = 1 if stacked else 0
        w = w.astype(jnp.float32)
        if method == "int8":
            contracted = tuple(range(lead, lead + in_dims))
            scale = jnp.max(jnp.abs(w), axis=contracted, keepdims=True) / 127.0
            codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale)).astype(jnp.int8)
        else:
            codes, scale = _nf4(w, lead)
        self.codes = nnx.Param(codes, logical_axes=axes)
        self.scale = nnx.Param(scale.astype(self.dtype), logical_axes=axes)

    def dequantize(self) -> jax.Array:
        codes, scale = self.codes[...], self.scale[...].astype(jnp.float32)
        if self.method == "int8":
            return (codes.astype(jnp.float32) * scale).astype(self.dtype)
        # Inside a scan the stacked axis is sliced away from codes and scales alike.
        lead = codes.ndim - (len(self.shape) - (1 if self.stacked else 0))
        codes = _unpack(codes, self.shape[-1])
        levels = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
        return (levels * _expand_blocks(scale, codes.shape, lead)).astype(self.dtype)


def _nf4(w: jax.Array, lead: int) -> tuple[jax.Array, jax.Array]:
    """Codes `[..., ceil(last / 2)]` (uint8, two per byte) and per-block scales `[..., ceil(D0 / block), ...]`."""
    d0 = w.shape[lead]
    blocks = -(-d0 // NF4_BLOCK)
    pad = blocks * NF4_BLOCK - d0
    padded = jnp.pad(w, [(0, pad) if i == lead else (0, 0) for i in range(w.ndim)])
    shaped = padded.reshape(w.shape[:lead] + (blocks, NF4_BLOCK) + w.shape[lead + 1:])
    scale = jnp.max(jnp.abs(shaped), axis=lead + 1)                                  # [..., blocks, ...]
    normed = shaped / jnp.expand_dims(jnp.where(scale == 0, 1.0, scale), lead + 1)
    codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
    codes = codes.reshape(padded.shape)[tuple(slice(0, d0) if i == lead else slice(None) for i in range(w.ndim))]
    return _pack(codes.astype(jnp.uint8)), scale


def _pack(codes: jax.Array) -> jax.Array:
    """4-bit codes, two to a byte along the last axis (low nibble first; an odd axis gets a zero)."""
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: jax.Array, last: int) -> jax.Array:
    both = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return both.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))[..., :last]


def _expand_blocks(scale: jax.Array, shape: tuple, lead: int) -> jax.Array:
    """Per-block scales repeated over their block's rows, cut to the kernel's first axis."""
    d0 = shape[lead]
    full = jnp.repeat(scale, NF4_BLOCK, axis=lead)
    return jax.lax.slice_in_dim(full, 0, d0, axis=lead)

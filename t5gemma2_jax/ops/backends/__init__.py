"""Attention backends by name, and `attend`, the one attention function every layer calls.

A backend is a module of this package with a function

    attention(q [B, T, H, d], k [B, S, K, d], v [B, S, K, d], mask: MaskInfo, scale, block_size)
        -> [B, T, H, d] in q's dtype

that equals the dense reference (`dense.py`) for every mask `MaskInfo` can describe. Adding one is
a new file here plus its line in `BACKENDS`; `register` adds one from outside the package (before
a config naming it is built). Modules load on first use, so a backend's heavy imports (Pallas)
cost nothing to runs that do not pick it. `auto` (the default) is not a kernel of its own: it
picks one of the others per call (`auto.choose`).
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax

from t5gemma2_jax.ops.masks import MaskInfo
from t5gemma2_jax.sharding import sequence_axis

# name -> module of this package defining `attention`, or a callable (see `register`).
BACKENDS: dict[str, str | Callable] = {
    "auto": "auto",              # the fastest exact one for the call's shapes, mask and target devices
    "dense": "dense",            # materialises the mask and the scores: the reference
    "blockwise": "blockwise",    # online softmax over key blocks, windows visit only their blocks
    "splash": "splash",          # Pallas splash attention (TPU) with lazy masks
    "cudnn": "cudnn",            # jax.nn.dot_product_attention(implementation="cudnn") on GPU
}


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def register(name: str, attention: Callable) -> None:
    """Make `attention_backend=name` use `attention` (same contract as the module functions)."""
    BACKENDS[name] = attention


def get(name: str) -> Callable:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {names()}")
    target = BACKENDS[name]
    if isinstance(target, str):
        target = BACKENDS[name] = importlib.import_module(f"{__name__}.{target}").attention
    return target


def target_platform() -> str:
    """The platform of the devices the program is traced for: the mesh's under `jax.set_mesh`
    (which is how a TPU topology is compiled for from a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float,
           backend: str = "dense", block_size: int = 512) -> jax.Array:
    """Multi-head attention with grouped KV heads.

    q `[B, T, H, d]`, k/v `[B, S, K, d]` with H % K == 0 (query head h uses KV head h // (H/K)).
    Returns `[B, T, H, d]` in q's dtype. Scores in the activation dtype, softmax in float32.
    When the current rules split the sequence over a mesh axis (the encoder under `mesh.context`),
    self-attention runs split too (`context.attention`: a halo exchange or a key gather per device).
    """
    if 0 < mask.num_self_keys != q.shape[1]:
        # Cached decoding (a few queries against a cache whose slots are not the queries'
        # positions, e.g. a ring buffer): the other backends need query i aligned with self key i,
        # and at T = 1 there is no [T, S] matrix worth avoiding.
        backend = "dense"
    split = sequence_axis()
    if split is not None:
        from t5gemma2_jax.ops.backends import context

        if context.unsupported_reason(q, k, mask, split[1]) is None:
            return context.attention(q, k, v, mask, scale=scale, block_size=block_size, backend=get(backend),
                                     axis=split[0], size=split[1])
    return get(backend)(q, k, v, mask, scale=scale, block_size=block_size)

"""How one Hugging Face tensor maps onto one of our parameters.

A mapping is a list of `HFEntry`. `path` is the parameter's path in `nnx.state(model)` (attribute
names and list indices); `index` selects a slice of the leading 'layers' axis of a scanned stack
(None when the parameter is not stacked). `to_ours` turns the HF tensor (numpy, HF layout) into
ours; `to_hf` is its inverse. Both must use only array methods (`.T`, `.reshape`, `.transpose`) so that they also
run on abstract shapes (`jax.eval_shape`), and must not change the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return x.T


@dataclass(frozen=True)
class HFEntry:
    hf_key: str
    path: tuple
    index: int | None = None
    to_ours: Transform = identity
    to_hf: Transform = identity

    def tensor_shape(self, param_shape) -> tuple[int, ...]:
        """Shape of this entry's tensor in our layout: the parameter's, less the layer axis of a stack."""
        return tuple(param_shape[1:] if self.index is not None else param_shape)

    def prefixed(self, *prefix) -> "HFEntry":
        return HFEntry(self.hf_key, tuple(prefix) + self.path, self.index, self.to_ours, self.to_hf)


def heads_in(N: int, d: int) -> tuple[Transform, Transform]:
    """A linear layer's `[N*d, D]` weight (out, in) <-> our input-major kernel `[D, N, d]`."""
    return (lambda w: w.T.reshape(w.shape[1], N, d)), (lambda k: k.reshape(k.shape[0], N * d).T)


def heads_out(N: int, d: int) -> tuple[Transform, Transform]:
    """A linear layer's `[D, N*d]` weight (out, in) <-> our kernel `[N, d, D]`."""
    return (lambda w: w.T.reshape(N, d, w.shape[0])), (lambda k: k.reshape(N * d, k.shape[-1]).T)


def heads_bias(N: int, d: int) -> tuple[Transform, Transform]:
    """A bias `[N*d]` <-> `[N, d]`."""
    return (lambda b: b.reshape(N, d)), (lambda b: b.reshape(N * d))

"""Host staging of checkpoint tensors on their way into a model's parameters.

Checkpoint readers (`load_hf`, `adapt_gemma3`) walk a checkpoint tensor by tensor. Each tensor
lands in one host buffer per parameter (a scanned stack's layers fill slices of one buffer), and
the buffers move to the device one parameter at a time, each freed as soon as it is there: host
memory never holds the checkpoint twice.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t5gemma2_jax.checkpoints.hf_mapping import HFEntry


def get_path(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


class HostStaging:
    """Host buffers for the leaves of `pure` (`nnx.to_pure_dict` of an abstract model's state)."""

    def __init__(self, pure: dict):
        self.pure = pure
        self._buffers: dict[tuple, np.ndarray] = {}

    def target_shape(self, entry: HFEntry) -> tuple[int, ...]:
        """The shape `entry.to_ours(tensor)` must have."""
        return entry.tensor_shape(get_path(self.pure, entry.path).shape)

    def buffer(self, path: tuple) -> np.ndarray:
        if path not in self._buffers:
            leaf = get_path(self.pure, path)
            self._buffers[path] = np.empty(leaf.shape, leaf.dtype)
        return self._buffers[path]

    def put(self, entry: HFEntry, value: np.ndarray) -> None:
        self.buffer(entry.path)[... if entry.index is None else entry.index] = value

    def to_device(self) -> None:
        """Replace each staged leaf of `pure` by a device array, freeing its host buffer first thing after."""
        for path in list(self._buffers):
            set_path(self.pure, path, jnp.asarray(self._buffers.pop(path)))

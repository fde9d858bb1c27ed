"""Host staging of checkpoint tensors on their way into a model's parameters.

Checkpoint readers (`load_hf`, `adapt_gemma3`) walk a checkpoint tensor by tensor. Each tensor
lands in one host buffer per parameter (a scanned stack's layers fill slices of one buffer), and
the buffers move to the device one parameter at a time, each freed as soon as it is there: host
memory never holds the checkpoint twice. Nothing is allocated for the model before that: it is
built abstractly and filled in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax.checkpoints.hf_mapping import HFEntry
from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.model import T5Gemma2


def get_path(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


class HostStaging:
    """Host buffers for the parameters of an abstract `T5Gemma2(config)`."""

    def __init__(self, config: T5Gemma2Config):
        abstract = nnx.eval_shape(lambda: T5Gemma2(config, rngs=nnx.Rngs(0)))
        self._graphdef, self._state = nnx.split(abstract)
        self.pure = nnx.to_pure_dict(self._state)
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

    def model(self, fresh: dict[tuple, jax.Array] | None = None) -> T5Gemma2:
        """The model: staged leaves moved to the device one by one (each host buffer freed first
        thing after), then `fresh` leaves (whole subtrees by path) from elsewhere."""
        for path in list(self._buffers):
            set_path(self.pure, path, jnp.asarray(self._buffers.pop(path)))
        for path, value in (fresh or {}).items():
            set_path(self.pure, path, value)
        unfilled = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_flatten_with_path(self.pure)[0]
                    if isinstance(leaf, jax.ShapeDtypeStruct)]
        if unfilled:
            raise AssertionError(f"parameters left unfilled: {unfilled}")
        nnx.replace_by_pure_dict(self._state, self.pure)
        return nnx.merge(self._graphdef, self._state)

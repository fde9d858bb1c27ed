"""Randomness for the stochastic parts of a forward pass (adapter dropout), given from outside.

The model holds no RNG state: the train step passes one key for its whole forward pass with
`dropout_key(key)`; a scanned layer stack gives each layer its own (`layer_keys`) and every user
folds in a fixed salt of its own, so no two sites or layers draw the same mask. Without a key
(evaluation, generation) nothing is random.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("t5gemma2_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


def current_dropout_key() -> jax.Array | None:
    return _KEY.get()


def layer_keys(n: int) -> jax.Array | None:
    """`n` keys split from the current one (for the layers of a scan), or None without one."""
    key = _KEY.get()
    return None if key is None else jax.random.split(key, n)

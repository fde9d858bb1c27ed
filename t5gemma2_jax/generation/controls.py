"""Generation controls applied to each step's logits inside the compiled loop: suppressed tokens,
a minimum number of new tokens before eos, and transformers' repetition penalty.

They run before temperature/top-k/top-p (`sampling.process_logits`), in transformers' order
(its processors come before its warpers). Every control at its default leaves the logits
untouched at trace time, so the compiled program is the one without controls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class LogitControls:
    """Hashable (it is part of the compiled loop's cache key)."""

    suppress: tuple[int, ...] = ()
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    eos_id: int = 1

    @property
    def tracks_history(self) -> bool:
        """Whether the loop must carry which tokens each row has produced."""
        return self.repetition_penalty != 1.0

    @property
    def lipschitz(self) -> float:
        """How much the controls can stretch a difference of logits (the penalty's factor)."""
        p = self.repetition_penalty
        return max(p, 1.0 / p) if self.tracks_history else 1.0

    def apply_at(self, logits: jax.Array, ids: jax.Array, t: jax.Array, seen: jax.Array | None) -> jax.Array:
        """`apply` on `[B, k]` logits of the token ids `ids [B, k]` only (the same values)."""
        if self.tracks_history:
            p = jnp.float32(self.repetition_penalty)
            penalised = jnp.where(logits > 0, logits / p, logits * p)
            logits = jnp.where(jnp.take_along_axis(seen, ids, axis=1), penalised, logits)
        if self.suppress:
            logits = jnp.where(jnp.isin(ids, jnp.asarray(self.suppress, ids.dtype)), -jnp.inf, logits)
        if self.min_new_tokens > 0:
            logits = jnp.where((ids == self.eos_id) & (t < self.min_new_tokens), -jnp.inf, logits)
        return logits

    def apply(self, logits: jax.Array, t: jax.Array, seen: jax.Array | None) -> jax.Array:
        """`[B, V]` logits for step `t` (0-based count of tokens generated so far); `seen [B, V]`
        marks the decoder ids so far (start token included), needed with a repetition penalty."""
        V = logits.shape[-1]
        if self.tracks_history:
            p = jnp.float32(self.repetition_penalty)
            penalised = jnp.where(logits > 0, logits / p, logits * p)
            logits = jnp.where(seen, penalised, logits)
        if self.suppress:
            banned = np.zeros(V, bool)
            banned[list(self.suppress)] = True
            logits = jnp.where(jnp.asarray(banned), -jnp.inf, logits)
        if self.min_new_tokens > 0:
            eos = jnp.arange(V) == self.eos_id
            logits = jnp.where(eos & (t < self.min_new_tokens), -jnp.inf, logits)
        return logits


def make_controls(*, vocab_size: int, eos_id: int, suppress_tokens: Sequence[int] | None = None,
                  min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> LogitControls:
    """Validated controls; a bad value raises a one-line ValueError naming it."""
    suppress = () if suppress_tokens is None else tuple(sorted({int(i) for i in suppress_tokens}))
    bad = [i for i in suppress if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"suppress_tokens: ids {bad} are outside the vocabulary of {vocab_size}")
    if len(suppress) == vocab_size:
        raise ValueError("suppress_tokens: every token of the vocabulary is suppressed")
    if not (isinstance(min_new_tokens, (int, np.integer)) and min_new_tokens >= 0):
        raise ValueError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
    if not (isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
    return LogitControls(suppress=suppress, min_new_tokens=int(min_new_tokens),
                         repetition_penalty=float(repetition_penalty), eos_id=int(eos_id))


def initial_seen(batch: int, vocab_size: int, start_id: int, controls: LogitControls) -> jax.Array | None:
    """`[batch, V]` history with the decoder start token marked (transformers penalises it too)."""
    if not controls.tracks_history:
        return None
    return jnp.zeros((batch, vocab_size), bool).at[:, start_id].set(True)


def mark_seen(seen: jax.Array | None, tokens: jax.Array) -> jax.Array | None:
    if seen is None:
        return None
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True)

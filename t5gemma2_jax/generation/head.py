"""Greedy decoding's head read at half the bytes: a bfloat16 screen over the vocabulary, its
answer certified exact or recomputed in full.

A greedy step needs only the argmax of the controlled logits, yet the float32 head reads the
whole `[V, D]` table (for 262k tokens x 640, 671 MB: two thirds of what a 270m-270m step reads).
Here each step instead

1. computes every logit from a bfloat16 copy of the table (float32 accumulation: half the bytes),
   applies the soft-cap and the controls, and takes the `CANDIDATES + 1` best;
2. recomputes the `CANDIDATES` best exactly, from their float32 rows, with the same soft-cap and
   controls;
3. keeps the exact winner when an error bound proves it is the full head's argmax: every
   non-candidate's logit is within `E` of its screened value and every exact logit within `e` of
   the full head's, so the winner must beat the best non-candidate by `E + 3e` and the runner-up
   by `4e` (each times the controls' stretch, see `LogitControls.lipschitz`). Otherwise, for the
   whole batch, the full float32 head runs, as without the screen.

Bounds, for `S = |x| * max_v |w_v|` (Cauchy-Schwarz on `sum_d |x_d w_vd|`): rounding `x` and the
table to bfloat16 (unit roundoff `u = 2^-8`) moves a logit by at most `(2u + u^2) S`; a float32
dot of `D` terms, in any order, by at most `g S` with `g = D 2^-24 / (1 - D 2^-24)`. So
`e = g S` and `E = (2u + u^2 + g (1 + u)^2) S + e`, both taken 1% larger for the rounding of `S`
itself. The chosen token is the full head's; only which path found it differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5gemma2_jax.generation.controls import LogitControls
from t5gemma2_jax.generation.sampling import greedy
from t5gemma2_jax.ops.backends import target_platform

# Vocabularies from this size on are screened (below it the table is too small to matter).
MIN_VOCAB = 32768
CANDIDATES = 16
_U = 2.0 ** -8


def screen(model) -> tuple[jax.Array, jax.Array] | None:
    """(bfloat16 table `[V, D]`, float32 largest row norm) for `screened_greedy`, computed once
    before a decoding loop (an extra V x D x 2 bytes for its duration), or None where the screen
    does not apply: a float32 head on CPU (on TPU and GPU the head is usually bfloat16 already)
    with at least `MIN_VOCAB` tokens."""
    table = model.output_head.table[...]
    if (target_platform() != "cpu" or jnp.dtype(model.config.dtype) != jnp.float32
            or table.dtype != jnp.float32 or table.shape[0] < MIN_VOCAB):
        return None
    return table.astype(jnp.bfloat16), jnp.sqrt(jnp.max(jnp.sum(table * table, axis=1)))


def screened_greedy(model, hidden: jax.Array, screened: tuple[jax.Array, jax.Array], controls: LogitControls,
                    t: jax.Array, seen: jax.Array | None) -> jax.Array:
    """`greedy(controls.apply(model.step_logits(hidden), t, seen))`, `[B]` int32, reading the
    bfloat16 table (and `CANDIDATES` float32 rows per row) when the bound allows it."""
    table16, row_norm = screened
    table = model.output_head.table[...]
    x = hidden.astype(jnp.float32)
    dims = (((1,), (1,)), ((), ()))
    approx = jax.lax.dot_general(x.astype(jnp.bfloat16), table16, dims, preferred_element_type=jnp.float32)
    approx = controls.apply(model.soft_cap(approx), t, seen)
    # The barrier keeps XLA:CPU's top-k kernel: slicing its outputs directly turns it into a sort
    # of the whole vocabulary, far slower than the kernel (docs/benchmarks_archive.md).
    top, ids = jax.lax.optimization_barrier(jax.lax.top_k(approx, CANDIDATES + 1))
    cand = jnp.sort(ids[:, :CANDIDATES], axis=1)           # by id: the first maximum is argmax's
    exact = jnp.einsum("BD,BKD->BK", x, jnp.take(table, cand, axis=0))
    exact = controls.apply_at(model.soft_cap(exact), cand, t, seen)
    pick = jnp.argmax(exact, axis=1)
    best = jnp.take_along_axis(exact, pick[:, None], axis=1)[:, 0]
    second = jnp.max(jnp.where(jnp.arange(CANDIDATES) == pick[:, None], -jnp.inf, exact), axis=1)
    D = x.shape[-1]
    g = D * 2.0 ** -24 / (1 - D * 2.0 ** -24)
    S = jnp.linalg.norm(x, axis=-1) * row_norm * 1.01 * controls.lipschitz
    e, E = g * S, (2 * _U + _U ** 2 + g * (1 + _U) ** 2) * S + g * S
    certain = (best - top[:, CANDIDATES] > E + 3 * e) & (best - second > 4 * e)
    chosen = jnp.take_along_axis(cand, pick[:, None], axis=1)[:, 0].astype(jnp.int32)
    return jax.lax.cond(jnp.all(certain), lambda: chosen,
                        lambda: greedy(controls.apply(model.step_logits(hidden).astype(jnp.float32), t, seen)))

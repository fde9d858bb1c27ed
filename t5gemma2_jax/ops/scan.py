"""Layer stacks: the repeating-period layout, the scan over stacked layers, and remat policies.

Both towers (the text towers' layer stacks and the SigLIP tower) build and apply their layers
with these functions, so a remat policy name means the same thing everywhere:

    none           keep every activation for the backward pass
    full           keep only each scanned step's (or unscanned layer's) input; recompute the rest
    save_dots      keep the results of matrix multiplications, recompute the elementwise work
    save_qkv_proj  keep the query/key/value projections (`checkpoint_name` 'query_proj', ...)
    save_out_proj  keep those and the attention output projection ('out_proj')

A stack of `n` identical modules is built once with a leading 'layers' axis on every parameter
(`stacked`) and applied with `jax.lax.scan` (`scan`), so compile time does not grow with depth;
layers that do not fit the repeating period run one by one (`call`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from t5gemma2_jax.ops import rng

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj"),
}


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of a remat name (None for 'none': no checkpointing)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {tuple(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def remat(fn: Callable, name: str, *, in_scan: bool) -> Callable:
    if name == "none":
        return fn
    # Outside a scan, XLA would merge the backward pass's recomputation with the forward pass
    # (common-subexpression elimination) and keep every activation alive: remat would do nothing.
    # A scan body cannot be merged that way, so there the barrier is left out.
    return jax.checkpoint(fn, policy=remat_policy(name), prevent_cse=not in_scan)


# ---------------------------------------------------------------------------------------------
# Layout of a stack whose layer types repeat with a period.


def layer_period(layer_types: tuple[str, ...]) -> int:
    """Smallest p such that the layer types repeat with period p (p == L if they never do)."""
    L = len(layer_types)
    for p in range(1, L + 1):
        if all(layer_types[i] == layer_types[i % p] for i in range(L)):
            return p
    return L


def stack_layout(layer_types: tuple[str, ...], scan: bool) -> tuple[int, int]:
    """(period, number of scanned blocks) of a stack."""
    period = layer_period(layer_types)
    return period, (len(layer_types) // period if scan else 0)


def layer_slot(period: int, num_blocks: int, i: int) -> tuple[tuple, int | None]:
    """Where layer `i` lives: (path relative to the stack, index on the 'layers' axis or None)."""
    first = num_blocks * period
    if i < first:
        return ("blocks", "layers", i % period), i // period
    return ("layers", i - first), None


# ---------------------------------------------------------------------------------------------
# Building and applying stacked modules.


def _add_layers_axis(module: nnx.Module) -> None:
    """Record the leading stacked axis in each parameter's logical axes (sharding rule 'layers')."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and var.get_metadata().get("logical_axes") is not None:
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` independently initialised copies of `make(rngs)` as one module whose parameters have a
    leading 'layers' axis of size `n`."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    module = build(rngs)
    _add_layers_axis(module)
    return module


def scan(module: nnx.Module, step: Callable, carry: Any, xs: Any = None, *, remat_name: str = "none"):
    """`jax.lax.scan` of `step(layer, carry, x) -> (carry, y)` over the stacked `module`'s layers
    (and the leading axis of `xs`); returns `(carry, ys)`. Under a dropout key (`ops.rng`) each
    layer gets its own."""
    graphdef, state = nnx.split(module)
    keys = rng.layer_keys(jax.tree.leaves(state)[0].shape[0])

    def body(c, inputs):
        layer_state, x, key = inputs
        with rng.dropout_key(key):
            return step(nnx.merge(graphdef, layer_state), c, x)

    return jax.lax.scan(remat(body, remat_name, in_scan=True), carry, (state, xs, keys))


def call(module: nnx.Module, step: Callable, carry: Any, *, remat_name: str = "none") -> Any:
    """`step(module, carry) -> carry` for one unscanned layer, rematerialised with a CSE barrier."""
    if remat_name == "none":
        return step(module, carry)
    graphdef, state = nnx.split(module)
    return remat(lambda c, s: step(nnx.merge(graphdef, s), c), remat_name, in_scan=False)(carry, state)

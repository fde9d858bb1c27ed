"""A tower's layers, applied as a `scan` over repeating blocks plus an unscanned remainder.

Gemma 3 repeats a fixed pattern of layer types (5 local + 1 global). The layers of one period form
a block; `L // period` blocks are stacked along a leading 'layers' axis and scanned, so compile
time does not grow with depth; the `L % period` layers left over run unscanned. With
`scan=False` every layer is its own module (useful for debugging and per-layer surgery).

Parameter layout (what checkpoints see):
  scanned:  blocks.layers[j].<param>  with a leading axis of size L // period (layer i = block
            i // period, position i % period), then layers[r] for the remainder i >= blocks*period
  unscanned: layers[i].<param>
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5gemma2_jax.config import TextConfig
from t5gemma2_jax.nn.layers import Layer, LayerContext

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj"),
}


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


def maybe_remat(fn, remat: str, in_scan: bool):
    if remat == "none":
        return fn
    # Outside a scan, XLA would merge the backward pass's recomputation with the forward pass
    # (common-subexpression elimination) and keep every activation alive: remat would do nothing.
    # A scan body cannot be merged that way, so there the barrier is left out.
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)


class Block(nnx.Module):
    """One period of consecutive layers (the unit that is scanned)."""

    def __init__(self, cfg: TextConfig, layer_types: tuple[str, ...], cross: dict, **layer_kw):
        rngs = layer_kw.pop("rngs")
        self.layers = nnx.List([Layer(cfg, t, cross=cross[t], rngs=rngs, **layer_kw) for t in layer_types])

    def __call__(self, x: jax.Array, ctx: LayerContext) -> jax.Array:
        for layer in self.layers:
            x = layer(x, ctx)
        return x

    def decode_step(self, x: jax.Array, ctx: LayerContext, caches: list) -> tuple[jax.Array, list]:
        out = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.decode_step(x, ctx, cache)
            out.append(cache)
        return x, out


def _add_layers_axis(module: nnx.Module) -> None:
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))


class LayerStack(nnx.Module):
    def __init__(self, cfg: TextConfig, *, scan: bool, remat: str, param_dtype, dtype,
                 backend: str, block_size: int = 512, cross: dict | None = None, encoder_dim: int | None = None,
                 rngs: nnx.Rngs):
        """`cross` maps each layer type to its encoder access (see `layers.CROSS_MODES`)."""
        types = cfg.layer_types
        cross = cross or {t: "none" for t in set(types)}
        layer_kw = dict(param_dtype=param_dtype, dtype=dtype, backend=backend, block_size=block_size,
                        encoder_dim=encoder_dim)
        self.period, self.num_blocks = stack_layout(types, scan)
        self.remat = remat
        if self.num_blocks > 0:
            period_types = types[: self.period]

            @nnx.split_rngs(splits=self.num_blocks)
            @nnx.vmap(in_axes=0, out_axes=0)
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, period_types, cross, rngs=rngs, **layer_kw)

            self.blocks = make_blocks(rngs)
            _add_layers_axis(self.blocks)
        else:
            self.blocks = None
        first = self.num_blocks * self.period
        self.layers = nnx.List([Layer(cfg, types[i], cross=cross[types[i]], rngs=rngs, **layer_kw)
                                for i in range(first, len(types))])

    def layer_slot(self, i: int) -> tuple[tuple, int | None]:
        return layer_slot(self.period, self.num_blocks, i)

    def __call__(self, x: jax.Array, ctx: LayerContext) -> jax.Array:
        if self.blocks is not None:
            graphdef, stacked = nnx.split(self.blocks)

            def body(h, block_state):
                return nnx.merge(graphdef, block_state)(h, ctx), None

            x, _ = jax.lax.scan(maybe_remat(body, self.remat, in_scan=True), x, stacked)
        for layer in self.layers:
            graphdef, state = nnx.split(layer)
            x = maybe_remat(lambda h, s, g=graphdef: nnx.merge(g, s)(h, ctx), self.remat, in_scan=False)(x, state)
        return x

    # ---- cached decoding -------------------------------------------------------------------
    def init_cache(self, encoder_states: jax.Array, sizes: dict[str, int], dtype) -> dict:
        """Per-layer caches, laid out like the parameters (`blocks` stacked, `layers` a list):
        empty self keys/values of `sizes[layer_type]` slots, and the encoder keys/values computed
        here once (`k_norm(k(enc))`, `v(enc)`, no RoPE)."""
        def cache(layer: Layer) -> dict:
            return layer.init_cache(encoder_states, sizes[layer.layer_type], dtype)

        out = {"blocks": [], "layers": [cache(layer) for layer in self.layers]}
        if self.blocks is not None:
            graphdef, stacked = nnx.split(self.blocks)

            def body(_, block_state):
                return None, [cache(layer) for layer in nnx.merge(graphdef, block_state).layers]

            _, out["blocks"] = jax.lax.scan(body, None, stacked)
        return out

    def decode_step(self, x: jax.Array, ctx: LayerContext, cache: dict) -> tuple[jax.Array, dict]:
        new = {"blocks": cache["blocks"], "layers": []}
        if self.blocks is not None:
            graphdef, stacked = nnx.split(self.blocks)

            def body(h, xs):
                block_state, block_cache = xs
                return nnx.merge(graphdef, block_state).decode_step(h, ctx, block_cache)

            x, new["blocks"] = jax.lax.scan(body, x, (stacked, cache["blocks"]))
        for layer, c in zip(self.layers, cache["layers"]):
            x, c = layer.decode_step(x, ctx, c)
            new["layers"].append(c)
        return x, new

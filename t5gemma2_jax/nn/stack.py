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
from flax import nnx

from t5gemma2_jax.config import TextConfig
from t5gemma2_jax.nn.attention import Numerics
from t5gemma2_jax.nn.layers import Layer, LayerContext
from t5gemma2_jax.ops import scan as scan_lib
from t5gemma2_jax.ops.scan import layer_slot, stack_layout


class Block(nnx.Module):
    """One period of consecutive layers (the unit that is scanned)."""

    def __init__(self, cfg: TextConfig, layer_types: tuple[str, ...], numerics: Numerics, cross: dict, *,
                 encoder_dim: int | None, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(cfg, t, numerics, cross=cross[t], encoder_dim=encoder_dim, rngs=rngs)
                                for t in layer_types])

    def __call__(self, x: jax.Array, ctx: LayerContext) -> jax.Array:
        for layer in self.layers:
            x, _ = layer(x, ctx)
        return x


class LayerStack(nnx.Module):
    def __init__(self, cfg: TextConfig, numerics: Numerics, *, scan: bool, remat: str, cross: dict | None = None,
                 encoder_dim: int | None = None, rngs: nnx.Rngs):
        """`cross` maps each layer type to its encoder access (see `layers.CROSS_MODES`)."""
        types = cfg.layer_types
        cross = cross or {t: "none" for t in set(types)}
        self.period, self.num_blocks = stack_layout(types, scan)
        self.remat = remat
        if self.num_blocks > 0:
            period_types = types[: self.period]
            self.blocks = scan_lib.stacked(lambda r: Block(cfg, period_types, numerics, cross, encoder_dim=encoder_dim,
                                                           rngs=r),
                                           self.num_blocks, rngs)
        else:
            self.blocks = None
        first = self.num_blocks * self.period
        self.layers = nnx.List([Layer(cfg, types[i], numerics, cross=cross[types[i]], encoder_dim=encoder_dim, rngs=rngs)
                                for i in range(first, len(types))])

    def layer_slot(self, i: int) -> tuple[tuple, int | None]:
        return layer_slot(self.period, self.num_blocks, i)

    def __call__(self, x: jax.Array, ctx: LayerContext) -> jax.Array:
        if self.blocks is not None:
            x, _ = scan_lib.scan(self.blocks, lambda block, h, _: (block(h, ctx), None), x,
                                 remat_name=self.remat)
        for layer in self.layers:
            x = scan_lib.call(layer, lambda m, h: m(h, ctx)[0], x, remat_name=self.remat)
        return x

    # ---- cached decoding -------------------------------------------------------------------
    def block_states(self) -> list:
        """Each scanned block's parameters (and other state), sliced out of the stack."""
        if self.blocks is None:
            return []
        state = nnx.split(self.blocks)[1]
        return [jax.tree.map(lambda a: a[j], state) for j in range(self.num_blocks)]

    def decode_layers(self, block_states: list | None = None) -> list[Layer]:
        """Every layer as a module of its own, in order: the scanned blocks' from `block_states`
        (`block_states()`, sliced here when not given), then the unscanned ones."""
        layers = []
        if self.blocks is not None:
            graphdef = nnx.split(self.blocks)[0]
            for state in self.block_states() if block_states is None else block_states:
                layers.extend(nnx.merge(graphdef, state).layers)
        return layers + list(self.layers)

    def init_cache(self, encoder_states: jax.Array, sizes: dict[str, int], dtype) -> list[dict]:
        """One cache per layer, in order: empty self keys/values of `sizes[layer_type]` slots, and the
        encoder keys/values computed here once (`k_norm(k(enc))`, `v(enc)`, no RoPE)."""
        return [layer.init_cache(encoder_states, sizes[layer.layer_type], dtype) for layer in self.decode_layers()]

    def decode_step(self, x: jax.Array, ctx: LayerContext, cache: list[dict],
                    layers: list[Layer] | None = None) -> tuple[jax.Array, list[dict]]:
        """One decoding step through every layer, unrolled: each layer's cache is a buffer of its
        own, updated in place (a scan would slice each block's caches out of stacked arrays, a
        copy of every cache per step where the backend does not fuse the slice into the matmul)."""
        layers = self.decode_layers() if layers is None else layers
        new = []
        for layer, c in zip(layers, cache):
            x, c = layer(x, ctx, c)
            new.append(c)
        return x, new

"""T5Gemma 2: a bidirectional Gemma 3 encoder (text + SigLIP image tokens) and a Gemma 3 decoder
whose attention is merged over [its own keys | encoder keys], sharing one embedding table.

    out = model(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, pixel_values)
    out.logits            # [B, T, V]
    out.encoder_states    # [B, S, D], the encoder's output (what `encode` returns)

`attention_mask`/`decoder_attention_mask` are 0/1 padding masks as in Hugging Face. For packed
batches pass `encoder_segment_ids`/`decoder_segment_ids` (0 = padding, one id per example) and
per-segment `encoder_positions`/`decoder_positions` instead: a decoder token then sees its own
segment's earlier decoder tokens and its own segment's encoder tokens only.

Called with concrete arrays, `model(...)`, `encode` and `decode` run one compiled program per
input shape (`compile_on_first_use`); called while tracing (inside `jax.jit`, `nnx.jit`,
`jax.grad`, the train step) they are the plain traced code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from t5gemma2_jax.config import FULL, SLIDING, T5Gemma2Config, TextConfig
from t5gemma2_jax.nn.attention import Numerics
from t5gemma2_jax.nn.embed import Embedder
from t5gemma2_jax.nn.layers import LayerContext
from t5gemma2_jax.nn.norm import RMSNorm
from t5gemma2_jax.nn.rope import rope_angles
from t5gemma2_jax.nn.stack import LayerStack
from t5gemma2_jax.ops import compiled
from t5gemma2_jax.ops.masks import MaskInfo, bidirectional_window, causal_window
from t5gemma2_jax.sharding import constrain, length_of


def _check_images(model: "T5Gemma2", arguments: dict) -> None:
    # Inside the compiled program the placeholders' values are unknown: check them before.
    if arguments.get("pixel_values") is not None:
        model.check_image_inputs(arguments["input_ids"], arguments["pixel_values"], arguments.get("image_mask"))


# A model call with concrete arrays runs one compiled program per input shape (`ops.compiled`).
compile_on_first_use = functools.partial(compiled.compile_on_first_use, check=_check_images)


@struct.dataclass
class ModelOutput:
    """What a forward pass gives: a pytree, so it passes through `jax.jit` and `nnx.jit`."""

    logits: jax.Array            # [B, T, V] in the compute dtype (soft-capped when configured)
    encoder_states: jax.Array    # [B, S, D] after the encoder's final norm


class Tower(nnx.Module):
    """Layer stack + final RMSNorm of one side (the embedding lives in the parent model)."""

    def __init__(self, cfg: TextConfig, model_cfg: T5Gemma2Config, *, cross: dict | None = None,
                 rngs: nnx.Rngs):
        pdt, dt = jnp.dtype(model_cfg.param_dtype), jnp.dtype(model_cfg.dtype)
        self.config = cfg
        numerics = Numerics(param_dtype=pdt, dtype=dt, backend=model_cfg.attention_backend,
                            block_size=model_cfg.attention_block_size)
        self.stack = LayerStack(cfg, numerics, scan=model_cfg.scan_layers, remat=model_cfg.remat, cross=cross,
                                encoder_dim=model_cfg.encoder.hidden_size, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)

    def rope_tables(self, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
        c = self.config
        return {
            SLIDING: rope_angles(positions, c.head_dim, c.rope_local_theta, c.rope_local_factor),
            FULL: rope_angles(positions, c.head_dim, c.rope_global_theta, c.rope_global_factor),
        }

    def __call__(self, x: jax.Array, ctx: LayerContext) -> jax.Array:
        return self.norm(self.stack(x, ctx))


def _as_int(x, name: str, shape: tuple[int, ...] | None = None) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape}")
    return x.astype(jnp.int32)


def _segments(name: str, shape, attention_mask, segment_ids):
    """(query segment ids, key segment ids) from a padding mask or packed segment ids."""
    if segment_ids is not None:
        if attention_mask is not None:
            raise ValueError(f"pass either the {name} attention mask or its segment ids, not both")
        seg = _as_int(segment_ids, f"{name}_segment_ids", shape)
        return seg, seg
    # Padding masks hide keys only: padded query rows still compute (their outputs are unused).
    keys = jnp.ones(shape, jnp.int32) if attention_mask is None else _as_int(attention_mask, f"{name} attention_mask", shape)
    return jnp.ones(shape, jnp.int32), keys


def _positions(name: str, shape, positions):
    if positions is None:
        return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
    return _as_int(positions, f"{name}_positions", shape)


class T5Gemma2(nnx.Module):
    def __init__(self, config: T5Gemma2Config, *, rngs: nnx.Rngs):
        pdt, dt = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        self.config = config
        emb_kw = dict(eoi_token_id=config.eoi_token_id, param_dtype=pdt, dtype=dt, rngs=rngs)
        self.embedder = Embedder(config.vocab_size, config.encoder.hidden_size, **emb_kw)
        if config.embeddings == "untied":
            self.decoder_embedder = Embedder(config.vocab_size, config.decoder.hidden_size, **emb_kw)
            self.lm_head = Embedder(config.vocab_size, config.decoder.hidden_size, **emb_kw)
        else:
            self.decoder_embedder = self.lm_head = None
        self.encoder = Tower(config.encoder, config, rngs=rngs)
        mode = {"merged": "merged", "separate": "separate", "global_only": "merged"}[config.cross_attention]
        cross = {FULL: mode, SLIDING: "none" if config.cross_attention == "global_only" else mode}
        self.decoder = Tower(config.decoder, config, cross=cross, rngs=rngs)
        if config.with_vision:
            from t5gemma2_jax.vision import VisionEncoder
            self.vision = VisionEncoder(config, rngs=rngs)
        else:
            self.vision = None

    # ------------------------------------------------------------------------------------------
    def embed_encoder_inputs(self, input_ids: jax.Array, pixel_values=None, image_mask=None) -> jax.Array:
        """Token embeddings with image features written over the image placeholder tokens."""
        x = self.embedder.encode(input_ids)
        if pixel_values is None:
            return x
        from t5gemma2_jax.vision import insert_image_features
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.ndim == 5 and image_mask is None:      # per row: [B, M, C, H, W], image_mask [B, M]
            image_mask = jnp.ones(pixel_values.shape[:2], bool)
        self.check_image_inputs(input_ids, pixel_values, image_mask)
        feats = self.vision(pixel_values)
        return insert_image_features(x, input_ids, feats, self.config.image_token_id,
                                     image_mask if pixel_values.ndim == 5 else None)

    def check_image_inputs(self, input_ids, pixel_values, image_mask=None) -> None:
        """Raise `ValueError` when `pixel_values` has the wrong rank or, on concrete inputs, when
        the image placeholders of `input_ids` do not match the images (the data pipeline checks too)."""
        from t5gemma2_jax.vision import check_image_placeholders
        if self.vision is None:
            raise ValueError("pixel_values given but this model was built without its vision tower "
                             "(with_vision=False / load_hf(..., text_only=True))")
        ndim = np.ndim(pixel_values)
        if ndim == 5:                       # per row, with image_mask [B, M] (all valid when absent)
            images = np.ones(np.shape(pixel_values)[:2], bool) if image_mask is None else image_mask
        elif ndim == 4:                     # Hugging Face: [N, C, H, W] in row-major placeholder order
            images = np.shape(pixel_values)[0]
        else:
            raise ValueError(f"pixel_values must be [num_images, C, H, W] or [batch, max_images, C, H, W], "
                             f"got shape {np.shape(pixel_values)}")
        if not compiled.traced((input_ids, images)):
            check_image_placeholders(np.asarray(input_ids), images if isinstance(images, int) else np.asarray(images),
                                     self.config.mm_tokens_per_image, self.config.image_token_id)

    @compile_on_first_use
    def encode(self, input_ids, attention_mask=None, *, pixel_values=None, image_mask=None,
               segment_ids=None, positions=None) -> tuple[jax.Array, jax.Array]:
        """Encoder output `[B, S, D]` and the key segment ids `[B, S]` the decoder's cross part uses."""
        input_ids = _as_int(input_ids, "input_ids")
        shape = input_ids.shape
        q_seg, kv_seg = _segments("encoder", shape, attention_mask, segment_ids)
        pos = _positions("encoder", shape, positions)
        x = self.embed_encoder_inputs(input_ids, pixel_values, image_mask)
        W = self.config.encoder.sliding_window
        masks = {
            FULL: MaskInfo(q_seg, pos, kv_seg, pos),
            SLIDING: MaskInfo(q_seg, pos, kv_seg, pos, window=bidirectional_window(W)),
        }
        ctx = LayerContext(rope=self.encoder.rope_tables(pos), masks=masks)
        # The encoder's sequence is split over the mesh axis `activation_encoder_length` names
        # (`mesh.context`); the decoder gathers the keys it reads from it.
        with length_of("encoder_length"):
            out = constrain(self.encoder(constrain(x, ("batch", "length", "embed")), ctx),
                            ("batch", "length", "embed"))
        return out, kv_seg

    @compile_on_first_use
    def decode(self, decoder_input_ids, encoder_states: jax.Array, encoder_segment_ids: jax.Array,
               decoder_attention_mask=None, *, segment_ids=None, positions=None) -> jax.Array:
        """Logits `[B, T, V]` given the encoder output and its key segment ids (from `encode`)."""
        ids = _as_int(decoder_input_ids, "decoder_input_ids")
        B, T = ids.shape
        if encoder_states.shape[0] != B:
            raise ValueError(f"decoder batch {B} != encoder batch {encoder_states.shape[0]}")
        q_seg, self_seg = _segments("decoder", (B, T), decoder_attention_mask, segment_ids)
        pos = _positions("decoder", (B, T), positions)
        S = encoder_states.shape[1]
        enc_seg = encoder_segment_ids.astype(jnp.int32)
        # Whole on every device, like the keys they describe (see `Attention.__call__`).
        kv_seg = constrain(jnp.concatenate([self_seg, enc_seg], axis=1), ("batch", "length"))
        kv_pos = constrain(jnp.concatenate([pos, jnp.zeros((B, S), jnp.int32)], axis=1), ("batch", "length"))
        W = self.config.decoder.sliding_window
        masks = {
            FULL: MaskInfo(q_seg, pos, kv_seg, kv_pos, causal=True, cross_start=T),
            SLIDING: MaskInfo(q_seg, pos, kv_seg, kv_pos, causal=True, window=causal_window(W), cross_start=T),
            # self keys only / encoder keys only (used by the ablation variants' layers)
            ("self", FULL): MaskInfo(q_seg, pos, self_seg, pos, causal=True),
            ("self", SLIDING): MaskInfo(q_seg, pos, self_seg, pos, causal=True, window=causal_window(W)),
            "cross": MaskInfo(q_seg, pos, enc_seg, jnp.zeros((B, S), jnp.int32), cross_start=0),
        }
        y = self.decoder_input_embedder.encode(ids)
        # Under context parallelism the encoder output arrives split over its sequence: gather it
        # here once (its D values per position), not every layer's projected keys and values.
        encoder_states = constrain(encoder_states, ("batch", "length", "embed"))
        ctx = LayerContext(rope=self.decoder.rope_tables(pos), masks=masks, encoder_states=encoder_states)
        # The decoder's positions (MLPs, head, loss) split like the encoder's; its attention reads
        # whole keys (its causal and merged masks run unsplit, `ops/backends/context`).
        with length_of("decoder_length"):
            logits = self.output_head.decode(self.decoder(constrain(y, ("batch", "length", "embed")), ctx))
        return self.soft_cap(logits)

    def soft_cap(self, logits: jax.Array) -> jax.Array:
        """`cap * tanh(logits / cap)` with the decoder's `final_logit_softcap` (identity when None):
        the one place the head's cap is applied, for training, scoring and every decoding path."""
        cap = self.config.decoder.final_logit_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    @property
    def decoder_input_embedder(self) -> Embedder:
        return self.embedder if self.decoder_embedder is None else self.decoder_embedder

    @property
    def output_head(self) -> Embedder:
        return self.embedder if self.lm_head is None else self.lm_head

    # ---- cached decoding ----------------------------------------------------------------------
    def init_cache(self, encoder_states: jax.Array, encoder_segment_ids: jax.Array, max_length: int) -> dict:
        """Decoding state for up to `max_length` decoder positions.

        Local layers keep a ring buffer of `sliding_window` slots, global layers `max_length`
        slots; every layer's encoder keys/values are computed here, once. `pos[type]` holds the
        position stored in each slot (-1 = empty); all rows decode in lockstep.
        """
        c = self.config.decoder
        sizes = {SLIDING: min(c.sliding_window, max_length), FULL: max_length}
        return {
            "layers": self.decoder.stack.init_cache(encoder_states, sizes, encoder_states.dtype),
            "pos": {t: jnp.full((n,), -1, jnp.int32) for t, n in sizes.items()},
            "encoder_segment_ids": encoder_segment_ids.astype(jnp.int32),
            "step": jnp.zeros((), jnp.int32),
        }

    def decode_step(self, tokens: jax.Array, cache: dict, layers=None) -> tuple[jax.Array, dict]:
        """Feed one token per row (`[B]`) at position `cache['step']`; return logits `[B, V]`.
        `layers` (`decoder.stack.decode_layers()`) may be computed once outside a decoding loop."""
        hidden, cache = self.decode_hidden(tokens, cache, layers)
        return self.step_logits(hidden), cache

    def step_logits(self, hidden: jax.Array) -> jax.Array:
        """The head on `decode_hidden`'s output: logits `[B, V]` (soft-capped when configured)."""
        return self.soft_cap(self.output_head.decode(hidden[:, None])[:, 0])

    def decode_hidden(self, tokens: jax.Array, cache: dict, layers=None) -> tuple[jax.Array, dict]:
        """`decode_step` up to the head: the decoder's normed output `[B, D]` and the new cache."""
        t = cache["step"]
        B = tokens.shape[0]
        enc_seg = cache["encoder_segment_ids"]
        W = self.config.decoder.sliding_window
        slots, pos, masks = {}, {}, {}
        q_seg, q_pos = jnp.ones((B, 1), jnp.int32), jnp.full((B, 1), t, jnp.int32)
        for layer_type, window in ((SLIDING, causal_window(W)), (FULL, None)):
            size = cache["pos"][layer_type].shape[0]
            slots[layer_type] = t % size
            # The layers attend to [their cached slots | this step's key | the encoder keys] and
            # write this step's key to its slot afterwards, so the slot it overwrites is empty here.
            cached = cache["pos"][layer_type].at[t % size].set(-1)
            pos[layer_type] = cache["pos"][layer_type].at[t % size].set(t)
            self_pos = jnp.concatenate([jnp.broadcast_to(cached, (B, size)), q_pos], axis=1)
            self_seg = (self_pos >= 0).astype(jnp.int32)
            masks[layer_type] = MaskInfo(
                q_segment_ids=q_seg, q_positions=q_pos,
                kv_segment_ids=jnp.concatenate([self_seg, enc_seg], axis=1),
                kv_positions=jnp.concatenate([self_pos, jnp.zeros_like(enc_seg)], axis=1),
                causal=True, window=window, cross_start=size + 1)
            masks[("self", layer_type)] = MaskInfo(q_seg, q_pos, self_seg, self_pos, causal=True, window=window)
        masks["cross"] = MaskInfo(q_seg, q_pos, enc_seg, jnp.zeros_like(enc_seg), cross_start=0)
        ctx = LayerContext(rope=self.decoder.rope_tables(jnp.full((B, 1), t, jnp.int32)), masks=masks, slots=slots)
        y = self.decoder_input_embedder.encode(tokens[:, None])
        y, caches = self.decoder.stack.decode_step(y, ctx, cache["layers"], layers)
        return self.decoder.norm(y)[:, 0], {**cache, "layers": caches, "pos": pos, "step": t + 1}

    @compile_on_first_use
    def __call__(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None,
                 pixel_values=None, *, image_mask=None, encoder_segment_ids=None, decoder_segment_ids=None,
                 encoder_positions=None, decoder_positions=None) -> ModelOutput:
        enc, enc_seg = self.encode(input_ids, attention_mask, pixel_values=pixel_values, image_mask=image_mask,
                                   segment_ids=encoder_segment_ids, positions=encoder_positions)
        logits = self.decode(decoder_input_ids, enc, enc_seg, decoder_attention_mask,
                             segment_ids=decoder_segment_ids, positions=decoder_positions)
        return ModelOutput(logits=logits, encoder_states=enc)


def count_params(config: T5Gemma2Config, *, vision: bool | None = None) -> dict[str, int]:
    """Parameter counts by part, computed on abstract shapes (nothing is allocated)."""
    cfg = config if vision is None else config.replace(with_vision=vision)
    abstract = nnx.eval_shape(lambda: T5Gemma2(cfg, rngs=nnx.Rngs(0)))
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(abstract, nnx.Param))[0]:
        top = str(getattr(path[0], "key", path[0]))
        counts[top] = counts.get(top, 0) + int(np.prod(leaf.shape))
    counts["text"] = sum(v for k, v in counts.items() if k != "vision")
    counts["total"] = counts["text"] + counts.get("vision", 0)
    return counts

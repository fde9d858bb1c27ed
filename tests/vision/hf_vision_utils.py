"""Helpers to build a tiny Hugging Face T5Gemma 2 reference with images, and to move its weights
through our HF entries. Reusable by the full-model parity tests: pytest puts tests/vision on
sys.path when it collects this folder (no __init__.py here); from elsewhere add it yourself,
`sys.path.insert(0, str(Path(__file__).parent / "vision"))`, then `import hf_vision_utils`.

    cfg = tiny_vision_config()                 # our T5Gemma2Config (the 'tiny' preset, float32)
    hf = build_hf_model(cfg)                   # T5Gemma2ForConditionalGeneration, fp32, eager, perturbed
    batch = make_mm_batch(cfg)                 # rows with 2, 0 and 1 images, right padding
    hf(input_ids=..., attention_mask=..., pixel_values=torch.from_numpy(batch['pixel_values']), ...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax.checkpoints.hf_mapping import HFEntry
from t5gemma2_jax.config import T5Gemma2Config, TextConfig, preset


def tiny_vision_config(**overrides) -> T5Gemma2Config:
    """Our 'tiny' preset: SigLIP 32 px, patch 4 (8x8 patches), width 32, 2 layers, 2 heads,
    16 tokens per image (2x2 pooling); text width 64. float32 for parity."""
    return preset("tiny", **{"dtype": "float32", "param_dtype": "float32", **overrides})


def _hf_text_kwargs(t: TextConfig) -> dict:
    def rope(theta: float, factor: float) -> dict:
        if factor == 1.0:
            return {"rope_type": "default", "rope_theta": theta}
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}

    qpas = t.query_pre_attn_scalar
    return dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, sliding_window=t.sliding_window,
        layer_types=list(t.layer_types),
        query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
        rope_parameters={
            "full_attention": rope(t.rope_global_theta, t.rope_global_factor),
            "sliding_attention": rope(t.rope_local_theta, t.rope_local_factor),
        },
        rms_norm_eps=t.rms_norm_eps, final_logit_softcapping=t.final_logit_softcap,
        max_position_embeddings=t.max_position_embeddings,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )


def hf_config_from_ours(cfg: T5Gemma2Config, attn_implementation: str = "eager"):
    """The `transformers.T5Gemma2Config` equivalent of ours (vision head off)."""
    from transformers import (T5Gemma2Config as HFConfig, T5Gemma2DecoderConfig, T5Gemma2EncoderConfig,
                              T5Gemma2TextConfig)

    v = cfg.vision
    vision = dict(image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                  hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                  layer_norm_eps=v.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    enc = T5Gemma2EncoderConfig(
        text_config=T5Gemma2TextConfig(**_hf_text_kwargs(cfg.encoder)), vision_config=vision,
        mm_tokens_per_image=cfg.mm_tokens_per_image, boi_token_index=cfg.boi_token_id,
        eoi_token_index=cfg.eoi_token_id, image_token_index=cfg.image_token_id,
    )
    # The top-level image_token_index overwrites the encoder's: it must be passed here too.
    return HFConfig(encoder=enc, decoder=T5Gemma2DecoderConfig(**_hf_text_kwargs(cfg.decoder)),
                    image_token_index=cfg.image_token_id, eoi_token_index=cfg.eoi_token_id,
                    attn_implementation=attn_implementation)


def build_hf_model(cfg: T5Gemma2Config, seed: int = 0):
    """fp32 eager `T5Gemma2ForConditionalGeneration` with every zero-initialised parameter (Gemma
    norms, eoi, projector, biases) drawn from N(0, 0.1) and SigLIP LayerNorm scales jittered, so
    that (1+w), biases and the projector are all exercised."""
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(hf_config_from_ours(cfg)).eval().to(torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if bool((p == 0).all()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "layer_norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def hf_state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Moving tensors through HFEntry lists (a minimal version of what load_hf/save_hf do).
# ------------------------------------------------------------------------------------------------


def load_entries(module: nnx.Module, tensors: dict[str, np.ndarray], entries: list[HFEntry],
                 key_fn=lambda k: k) -> None:
    """Write `tensors` (HF keys, after `key_fn`) into `module` in place through `entries`.

    `module` may be abstract (`nnx.eval_shape(...)`): then every parameter must be covered."""
    state = nnx.state(module, nnx.Param)

    def base(var) -> np.ndarray:
        v = var.get_value()
        if isinstance(v, jax.ShapeDtypeStruct):
            return np.zeros(v.shape, v.dtype)
        return np.array(v)

    flat = {path: base(var) for path, var in state.flat_state()}
    tensors = {key_fn(k): v for k, v in tensors.items()}
    for e in entries:
        if e.hf_key not in tensors:
            raise KeyError(f"missing HF tensor {e.hf_key}")
        if e.path not in flat:
            raise KeyError(f"no parameter at {e.path}")
        value = e.to_ours(tensors[e.hf_key])
        target = flat[e.path] if e.index is None else flat[e.path][e.index]
        if value.shape != target.shape:
            raise ValueError(f"{e.hf_key}: shape {value.shape} -> {target.shape} at {e.path}")
        if e.index is None:
            flat[e.path] = value.astype(flat[e.path].dtype)
        else:
            flat[e.path][e.index] = value
    for path, var in state.flat_state():
        var.set_value(jnp.asarray(flat[path]))
    nnx.update(module, state)


def from_hf(cfg: T5Gemma2Config, tensors: dict[str, np.ndarray], key_fn=lambda k: k):
    """A `VisionEncoder` holding the HF weights, built abstractly (no random init to compile)."""
    from t5gemma2_jax.checkpoints.hf_vision import vision_hf_entries
    from t5gemma2_jax.vision import VisionEncoder

    model = nnx.eval_shape(lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)))
    load_entries(model, tensors, vision_hf_entries(cfg), key_fn=key_fn)
    return model


def fill_random(module: nnx.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every parameter of a (possibly abstract) module N(0, scale) values from numpy: as good
    as an init for numerical tests, and with nothing for XLA to compile."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    for _, var in state.flat_state():
        v = var.get_value()
        var.set_value(jnp.asarray((scale * rng.standard_normal(v.shape)).astype(v.dtype)))
    nnx.update(module, state)


def export_entries(module: nnx.Module, entries: list[HFEntry]) -> dict[str, np.ndarray]:
    flat = {path: np.asarray(var[...]) for path, var in nnx.state(module, nnx.Param).flat_state()}
    out = {}
    for e in entries:
        value = flat[e.path] if e.index is None else flat[e.path][e.index]
        out[e.hf_key] = e.to_hf(np.asarray(value))
    return out


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def make_pixel_values(n: int, cfg: T5Gemma2Config, seed: int = 0) -> np.ndarray:
    """[n, C, H, W] float32 in [-1, 1] (the range preprocessing produces)."""
    v = cfg.vision
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, v.num_channels, v.image_size, v.image_size)).astype(np.float32)


def make_mm_batch(cfg: T5Gemma2Config, seed: int = 0, images_per_row=(2, 0, 1)) -> dict[str, np.ndarray]:
    """A right-padded encoder batch whose rows hold the given numbers of images.

    Returns `input_ids`/`attention_mask [B, S]`, `pixel_values [N_img, C, H, W]` (flat, in
    row-major placeholder order, the HF layout), `pixel_values_per_row [B, M, C, H, W]` and
    `image_mask [B, M]` (the per-row layout; empty slots hold zeros), and `decoder_input_ids`.
    """
    rng = np.random.default_rng(seed)
    n = cfg.mm_tokens_per_image
    special = {cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.boi_token_id,
               cfg.eoi_token_id, cfg.image_token_id}
    lo = max(special) + 1

    def text(k: int) -> list[int]:
        return rng.integers(lo, cfg.vocab_size, k).tolist()

    rows = []
    for b, m in enumerate(images_per_row):
        ids = [cfg.bos_token_id] + text(2 + b)
        for _ in range(m):
            ids += [cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id] + text(2)
        rows.append(ids)
    S = max(len(r) for r in rows) + 3  # every row gets some right padding
    B, M = len(rows), max(max(images_per_row), 1)
    input_ids = np.full((B, S), cfg.pad_token_id, np.int32)
    mask = np.zeros((B, S), np.int32)
    for b, r in enumerate(rows):
        input_ids[b, :len(r)] = r
        mask[b, :len(r)] = 1
    n_img = int(sum(images_per_row))
    flat_px = make_pixel_values(n_img, cfg, seed)
    v = cfg.vision
    per_row = np.zeros((B, M, v.num_channels, v.image_size, v.image_size), np.float32)
    image_mask = np.zeros((B, M), bool)
    i = 0
    for b, m in enumerate(images_per_row):
        per_row[b, :m] = flat_px[i:i + m]
        image_mask[b, :m] = True
        i += m
    T = 6
    dec = rng.integers(lo, cfg.vocab_size, (B, T)).astype(np.int32)
    dec[:, 0] = cfg.bos_token_id
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=flat_px,
                pixel_values_per_row=per_row, image_mask=image_mask, decoder_input_ids=dec)


__all__ = [
    "tiny_vision_config", "hf_config_from_ours", "build_hf_model", "hf_state_dict_numpy",
    "load_entries", "export_entries", "from_hf", "fill_random", "make_pixel_values", "make_mm_batch",
]

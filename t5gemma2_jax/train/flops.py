"""Analytic FLOP count of a training step, and the per-device peak that MFU divides by.

Counted like MaxText so MFU figures compare: 2 FLOPs per multiply-add, matmuls only (norms,
softmax, RoPE are noise), training = 3x forward (forward + two backward matmuls per forward matmul)
for trainable parts. Attention per query counts only the keys it may see:
  - encoder local layers: min(window, S) keys (bidirectional window); global layers: S keys;
  - decoder self part: causal, so query i sees min(i + 1, W) keys (local) or i + 1 (global):
    on average ~T/2 for global layers ("causal halving");
  - decoder cross part (merged attention): all S encoder keys in every decoder layer, plus the
    encoder states' K/V projections in every decoder layer (the ablations `separate` and
    `global_only` are counted as they compute);
  - LM head (tied embedding): 2 * D * V per decoder token.
Vision: the SigLIP tower on every image slot of the batch (forward only when frozen: pixels need
no gradient), the projector trained (3x). Padding positions are counted (the hardware computes
them), remat recomputation is not (this is model FLOPs, not hardware FLOPs).

`StepFlops.hardware_per_step(remat)` adds the recomputation, and `step_flops(..., all_keys=True)`
counts attention the way the dense backend computes it (every key, masked or not): together they
are what XLA's cost analysis of a compiled step should report (`scripts/aot_compile.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass

from t5gemma2_jax.config import FULL, T5Gemma2Config, TextConfig

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per chip. Matched against `device.device_kind` (first match wins).
PEAK_TFLOPS = (
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU7x", 2307.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0), ("TPU v3", 123.0), ("TPU v2", 45.0),
    ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
    ("V100", 125.0),
)


def _proj_mlp_per_token(c: TextConfig) -> float:
    D, H, K, d, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return 2.0 * D * (H * d + 2 * K * d) + 2.0 * H * d * D + 2.0 * 3 * D * F


def _causal_keys(T: int, window: int | None) -> float:
    """Average keys a causal query sees over T queries (window W includes the query)."""
    if window is None or window >= T:
        return (T + 1) / 2.0
    W = window
    return (W * (W + 1) / 2.0 + (T - W) * W) / T


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs per batch row by part, and the training total for the whole batch."""

    encoder: float
    decoder: float
    lm_head: float
    vision_tower: float
    projector: float
    batch: int
    vision_trainable: bool = False
    attention: float = 0.0          # of encoder + decoder: the score and value matmuls (no weights)
    text_trainable: bool = True     # False with adapters: no weight gradients for the base (2x, not 3x)

    @property
    def forward_per_row(self) -> float:
        return self.encoder + self.decoder + self.lm_head + self.vision_tower + self.projector

    @property
    def train_per_step(self) -> float:
        text = self.encoder + self.decoder + self.lm_head + self.projector
        # Backward is 2x forward: input gradients plus weight gradients. A frozen base skips the
        # latter for every weight matmul; the attention matmuls have two inputs and keep both.
        text = 3.0 * text if self.text_trainable else 2.0 * text + self.attention
        vis = (3.0 if self.vision_trainable else 1.0) * self.vision_tower
        return self.batch * (text + vis)

    def hardware_per_step(self, remat: str) -> float:
        """Training FLOPs including remat: `full` runs each encoder/decoder layer's forward twice
        (4x instead of 3x); the embedding, LM head and projector sit outside the remat scopes.
        `save_dots` keeps every matmul output (no matmul is recomputed). The partial policies
        (`save_qkv_proj`, `save_out_proj`) recompute most of a layer and are counted like `full`."""
        if remat in ("none", "save_dots"):
            return self.train_per_step
        layers = self.encoder + self.decoder
        vis_layers = self.vision_tower if self.vision_trainable else 0.0
        return self.train_per_step + self.batch * (layers + vis_layers)


def encoder_forward(c: TextConfig, S: int, all_keys: bool = False, attention_only: bool = False) -> float:
    f = 0.0 if attention_only else S * c.num_layers * _proj_mlp_per_token(c)
    for t in c.layer_types:
        keys = S if (t == FULL or all_keys) else min(c.sliding_window, S)
        f += 4.0 * c.num_heads * c.head_dim * S * keys
    return f


def decoder_forward(c: TextConfig, T: int, S: int, cross_attention: str = "merged",
                    encoder_dim: int | None = None, all_keys: bool = False, attention_only: bool = False) -> float:
    """Decoder forward FLOPs for one row. `cross_attention` is the model's: "merged" (T5Gemma 2:
    encoder keys in every layer's softmax), "separate" (a cross-attention sublayer per layer with
    its own projections) or "global_only" (merged in global layers, no encoder access in local).
    `attention_only`: the score and value matmuls alone."""
    H, K, d = c.num_heads, c.num_kv_heads, c.head_dim
    Denc = encoder_dim or c.hidden_size
    w = 0.0 if attention_only else 1.0      # weight matmuls counted, or not
    f = w * T * c.num_layers * _proj_mlp_per_token(c)
    for t in c.layer_types:
        self_keys = T if all_keys else _causal_keys(T, None if t == FULL else c.sliding_window)
        cross = cross_attention if not (cross_attention == "global_only" and t != FULL) else "none"
        if cross == "none":
            f += 4.0 * H * d * T * self_keys
            continue
        f += w * S * 2.0 * Denc * 2 * K * d  # the encoder states' keys and values in this layer
        if cross == "separate":
            f += 4.0 * H * d * T * self_keys + 4.0 * H * d * T * S
            f += w * T * (2.0 * c.hidden_size * H * d + 2.0 * H * d * c.hidden_size)  # cross q and o
        else:  # merged / global_only: one softmax over [self keys | encoder keys]
            f += 4.0 * H * d * T * (self_keys + S)
    return f


def vision_forward(cfg: T5Gemma2Config) -> tuple[float, float]:
    """(SigLIP tower, projector) forward FLOPs per image."""
    v = cfg.vision
    N = v.patches_per_side ** 2
    Dv, Fv = v.hidden_size, v.intermediate_size
    tower = 2.0 * v.num_channels * v.patch_size ** 2 * Dv * N
    tower += v.num_layers * (N * (2.0 * 4 * Dv * Dv + 2.0 * 2 * Dv * Fv) + 4.0 * Dv * N * N)
    projector = 2.0 * Dv * cfg.hidden_size * cfg.mm_tokens_per_image
    return tower, projector


def step_flops(cfg: T5Gemma2Config, *, batch: int, encoder_length: int, decoder_length: int,
               images_per_row: int = 0, vision_trainable: bool = False, all_keys: bool = False,
               text_trainable: bool = True) -> StepFlops:
    """`all_keys`: count attention over every key, as the dense backend computes it.
    `text_trainable=False`: the base is frozen (adapters train; their own FLOPs, about
    rank x (in + out) / (in x out) of each projection's, are left out)."""
    S, T = encoder_length, decoder_length
    tower = projector = 0.0
    if images_per_row and cfg.with_vision:
        t, p = vision_forward(cfg)
        tower, projector = images_per_row * t, images_per_row * p
    cross = getattr(cfg, "cross_attention", "merged")
    decoder = decoder_forward(cfg.decoder, T, S, cross, cfg.encoder.hidden_size, all_keys)
    attention = (encoder_forward(cfg.encoder, S, all_keys, attention_only=True)
                 + decoder_forward(cfg.decoder, T, S, cross, cfg.encoder.hidden_size, all_keys, attention_only=True))
    return StepFlops(encoder=encoder_forward(cfg.encoder, S, all_keys), decoder=decoder,
                     lm_head=2.0 * T * cfg.decoder.hidden_size * cfg.vocab_size, vision_tower=tower,
                     projector=projector, batch=batch, vision_trainable=vision_trainable,
                     attention=attention, text_trainable=text_trainable)


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s per device.


def peak_flops_per_device(device=None, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    import jax

    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for pattern, tflops in PEAK_TFLOPS:
        if pattern.lower() in kind.lower():
            return tflops * 1e12, f"table ({kind}, dense bf16)"
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured CPU fp32 matmul"
    log.warning("unknown device kind %r: MFU is not reported (set train.peak_tflops)", kind)
    return 0.0, f"unknown ({kind})"


def measured_cpu_peak(size: int = 2048, reps: int = 5) -> float:
    """FLOP/s of one CPU device: the best of `reps` fp32 matmuls on device 0, shared by the local
    CPU devices (fake devices share the cores). Cached per machine in the t5gemma2_jax cache.

    2048² by default: a 512² matmul reaches about half of the machine's rate, which made a train
    step's MFU read above 100% (docs/benchmarks_archive.md)."""
    import jax
    import jax.numpy as jnp

    n = len(jax.local_devices())
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|{size}"
    path = _cache_path()
    cache = {}
    if path is not None and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    if key not in cache:
        x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.local_devices()[0])
        f = jax.jit(lambda a: a @ a)
        f(x).block_until_ready()
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t)
        cache[key] = 2.0 * size ** 3 / best
        if path is not None:
            try:
                from t5gemma2_jax.data.cache import atomic_write_bytes
                atomic_write_bytes(path, json.dumps(cache).encode())
            except OSError:
                pass
    return cache[key] / n


def measured_matmul_peak(device=None, size: int = 8192, dtype: str = "bfloat16", reps: int = 10,
                         rounds: int = 3) -> float:
    """FLOP/s of a `size`³ matmul in `dtype` on `device`: the best round of `reps` products
    dispatched back to back (one wait per round, so launch gaps overlap), after a warm-up. The
    inputs are random normal: products of zeros run faster than real data on some GPUs. The
    achievable dense peak that a train step's MFU can be held against beside the datasheet's."""
    import jax
    import jax.numpy as jnp

    device = device or jax.local_devices()[0]
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32).astype(dtype), device) for k in (ka, kb))
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        outs = [f(a, b) for _ in range(reps)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2.0 * size ** 3 / best


def _cache_path():
    try:
        from t5gemma2_jax.data.cache import cache_dir
        return cache_dir() / "cpu_peak_flops.json"
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# What XLA says about a compiled program.


def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program (per device for SPMD programs), when it reports one."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program: arguments, outputs, temporaries, code, and the total
    with donated arguments (aliased to outputs) counted once."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code", "alias")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out

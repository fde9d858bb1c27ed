"""The analytic FLOP count: matmuls from the parameter shapes, window / causal / cross attention,
agreement with XLA's own count of the lowered program, and the per-device peak."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from helpers import batch_for, small_config
from t5gemma2_jax.config import FULL, preset
from t5gemma2_jax.experiment import LoraConfig
from t5gemma2_jax.modeldef import ModelDef
from t5gemma2_jax.train import flops as F
from t5gemma2_jax.train.step import loss_sums

LAYER_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def test_projection_and_mlp_flops_are_twice_the_matmul_parameters():
    cfg = preset("tiny", with_vision=False)
    shapes = ModelDef(cfg).shapes()
    tower = [s for n, s in shapes.items() if n.startswith("encoder.") and n.endswith(LAYER_MATRICES)]
    matmul_params = sum(int(np.prod(s.shape)) for s in tower)
    S = 64
    attention = sum(4 * 4 * 16 * S * (S if t == FULL else min(8, S)) for t in cfg.encoder.layer_types)
    assert F.encoder_forward(cfg.encoder, S) == 2 * S * matmul_params + attention


def test_attention_counts_only_visible_keys():
    c = preset("tiny").encoder.replace(num_layers=2, layer_types=("sliding_attention", "full_attention"))
    H, d, W = c.num_heads, c.head_dim, c.sliding_window
    base = lambda S: 2 * S * F._proj_mlp_per_token(c)  # noqa: E731
    # encoder: the local layer sees W keys, the global one all S
    assert F.encoder_forward(c, 64) - base(64) == 4 * H * d * 64 * (W + 64)
    # decoder: causal (global: (T+1)/2 keys on average; local: at most W) plus all S encoder keys
    T, S = 32, 64
    cross_kv = S * 2 * 2 * c.hidden_size * 2 * c.num_kv_heads * d
    local_keys = (W * (W + 1) / 2 + (T - W) * W) / T
    expected = 4 * H * d * T * (((T + 1) / 2 + S) + (local_keys + S))
    assert F.decoder_forward(c, T, S) - base(T) - cross_kv == pytest.approx(expected)
    # training = 3x forward; a frozen vision tower only runs forward
    m = preset("tiny")
    sf = F.step_flops(m, batch=2, encoder_length=64, decoder_length=32, images_per_row=1)
    assert sf.train_per_step == pytest.approx(2 * (3 * (sf.forward_per_row - sf.vision_tower) + sf.vision_tower))
    assert F.step_flops(m, batch=2, encoder_length=64, decoder_length=32, images_per_row=1,
                        vision_trainable=True).train_per_step == pytest.approx(6 * sf.forward_per_row)


def test_all_keys_counts_what_the_dense_backend_computes():
    m = preset("tiny", with_vision=False)
    S, T = 64, 32
    visible = F.step_flops(m, batch=1, encoder_length=S, decoder_length=T)
    every = F.step_flops(m, batch=1, encoder_length=S, decoder_length=T, all_keys=True)
    extra = sum(4 * m.encoder.num_heads * m.encoder.head_dim * S * (S - (S if t == FULL else min(m.encoder.sliding_window, S)))
                for t in m.encoder.layer_types)
    extra += sum(4 * m.decoder.num_heads * m.decoder.head_dim * T
                 * (T - F._causal_keys(T, None if t == FULL else m.decoder.sliding_window)) for t in m.decoder.layer_types)
    assert every.forward_per_row - visible.forward_per_row == pytest.approx(extra)
    # remat `full` runs the layers' forward once more; the LM head is outside the remat scope
    assert every.hardware_per_step("full") - every.train_per_step == pytest.approx(every.encoder + every.decoder)
    assert every.hardware_per_step("save_dots") == every.train_per_step


@pytest.mark.parametrize("images, ablation", [
    (False, {}), (True, {}),
    (False, {"cross_attention": "separate", "embeddings": "untied"}),
    (False, {"cross_attention": "global_only"}),
    (False, {"remat": "full"}),
    (False, {"lora": True}),
])
def test_agrees_with_xla_count_of_the_lowered_program(images, ablation):
    """With adapters (rank 1: their own FLOPs are left out) the base's weight gradients are not
    computed: XLA's count falls with the analytic one."""
    ablation = dict(ablation)
    lora = LoraConfig(rank=1) if ablation.pop("lora", False) else None
    cfg = small_config(images=images, model={"scan_layers": False, **ablation})
    m = cfg.model_config()
    md = ModelDef(m, lora=lora)
    b = batch_for(cfg)
    B, S = b["encoder_input_ids"].shape
    T = b["decoder_input_ids"].shape[1]
    sf = F.step_flops(m, batch=B, encoder_length=S, decoder_length=T, images_per_row=1 if images else 0,
                      all_keys=True, text_trainable=lora is None)
    args = (md.shapes("trainable"), md.shapes("frozen"), b)
    fwd = jax.jit(lambda p, f, b: loss_sums(md, p, f, b)[0]).lower(*args).cost_analysis()["flops"]
    train = jax.jit(lambda p, f, b: jax.grad(lambda p: loss_sums(md, p, f, b)[0])(p)).lower(*args).cost_analysis()["flops"]
    # XLA also counts elementwise work (norms, softmax, GELU): a few percent above the matmuls.
    assert 1.0 <= fwd / (B * sf.forward_per_row) < 1.1
    assert 1.0 <= train / sf.hardware_per_step(m.remat) < 1.1


def test_peak_flops_per_device():
    fake = lambda kind, platform="tpu": types.SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
    assert F.peak_flops_per_device(fake("TPU v5 lite"))[0] == 197e12
    assert F.peak_flops_per_device(fake("TPU v5"))[0] == 459e12
    assert F.peak_flops_per_device(fake("TPU v6 lite"))[0] == 918e12
    assert F.peak_flops_per_device(fake("TPU v4"))[0] == 275e12
    assert F.peak_flops_per_device(fake("NVIDIA H100 80GB HBM3", "gpu"))[0] == 989e12
    assert F.peak_flops_per_device(fake("NVIDIA A100-SXM4-40GB", "gpu"))[0] == 312e12
    assert F.peak_flops_per_device(fake("Mystery", "gpu"))[0] == 0.0
    assert F.peak_flops_per_device(fake("Mystery", "gpu"), override_tflops=100.0)[0] == 100e12
    cpu, source = F.peak_flops_per_device(jax.devices()[0])
    assert cpu > 0 and "measured" in source

"""LoRA adapters against PEFT on transformers (the reference for adapters): our adapted logits
equal transformers + peft loading our `save_peft` directory, a PEFT-made adapter loads into ours,
merging equals the adapted model, QLoRA bases stay close, and bad input is named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import T5Gemma2ForConditionalGeneration

import t5gemma2_jax as tg
from t5gemma2_jax.adapters import lora_sites
from hf_reference import BOI, EOI, IMAGE, build_hf_model, hf_forward, text_inputs

TOL = 1e-4
TOKENS = 4
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2",
               "multi_modal_projector"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = build_hf_model(seed=5, encoder=dict(window=4, pattern=3, layers=5), mm_tokens_per_image=TOKENS)
    path = tmp_path_factory.mktemp("hf_lora")
    hf.save_pretrained(path)
    return hf, path


def _randomize(model, seed=0):
    """Non-zero A and B everywhere (B starts at zero, which would hide every mapping bug)."""
    for n, (_, lora) in enumerate(lora_sites(model)):
        ka, kb = jax.random.split(jax.random.key(seed * 1000 + n))
        lora.a.set_value(0.3 * jax.random.normal(ka, lora.a.shape))
        lora.b.set_value(0.3 * jax.random.normal(kb, lora.b.shape))
    return model


def _image_batch(seed=0):
    rng = np.random.default_rng(seed)
    image = [BOI] + [IMAGE] * TOKENS + [EOI]
    rows = [[2, 11] + image + [12, 13], [2] + list(rng.integers(7, 99, 9))]
    ids = np.zeros((2, 12), np.int64)
    mask = np.zeros((2, 12), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, 1
    dids = rng.integers(7, 99, (2, 6))
    dids[:, 0] = 2
    return ids, mask, dids, np.ones_like(dids), rng.normal(size=(1, 3, 16, 16)).astype(np.float32)


def _ours(model, ids, mask, dids, dmask, pixels=None):
    out = model(jnp.asarray(ids), jnp.asarray(dids), jnp.asarray(mask), jnp.asarray(dmask),
                None if pixels is None else jnp.asarray(pixels))
    return np.asarray(out.logits)


def _hf_with_adapter(path, adapter):
    import peft     # here, not at the top: importing peft takes seconds in every collecting process

    base = T5Gemma2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    return peft.PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("scan", [pytest.param(True, marks=pytest.mark.slow), False])
def test_an_adapted_model_equals_its_base_until_trained(hf_dir, scan):
    _, path = hf_dir
    base = tg.load_hf(path, scan_layers=scan)
    adapted = tg.apply_lora(tg.load_hf(path, scan_layers=scan), rank=4, alpha=8)
    ids, mask, dids, dmask = text_inputs(0)
    # B = 0: the update is exactly zero; the sums around it may be fused differently (float32 ulps).
    np.testing.assert_allclose(_ours(adapted, ids, mask, dids, dmask), _ours(base, ids, mask, dids, dmask),
                               atol=1e-6, rtol=0)
    lora = nnx.state(adapted, nnx.LoRAParam)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lora)[0]}
    assert names and all("_lora" in n for n in names)
    # Default targets: the 7 projections of every text layer, nothing in the vision path.
    assert {s.path[-1] for s, _ in lora_sites(adapted)} == {"q", "k", "v", "o", "gate", "up", "down"}


@pytest.mark.slow
def test_text_and_image_rows_equal_transformers_with_peft(hf_dir, tmp_path):
    hf, path = hf_dir
    ours = _randomize(tg.apply_lora(tg.load_hf(path), rank=3, alpha=5, targets=ALL_TARGETS))
    assert {s.path[-1] for s, _ in lora_sites(ours)} >= {"q_kernel", "out_kernel", "fc1_kernel", "kernel"}
    tg.save_peft(ours, tmp_path / "adapter")
    theirs = _hf_with_adapter(path, tmp_path / "adapter")
    ids, mask, dids, dmask = text_inputs(1)
    ref = hf_forward(theirs, ids, mask, dids, dmask).logits.numpy()
    got = _ours(ours, ids, mask, dids, dmask)
    assert np.abs(got - ref).max() <= TOL
    assert np.abs(got - hf_forward(hf, ids, mask, dids, dmask).logits.numpy()).max() > 1e-2   # adapters matter
    ids, mask, dids, dmask, pixels = _image_batch()
    ref = hf_forward(theirs, ids, mask, dids, dmask, pixel_values=pixels).logits.numpy()
    assert np.abs(_ours(ours, ids, mask, dids, dmask, pixels) - ref).max() <= TOL


def test_an_adapter_made_by_peft_loads_into_ours(hf_dir, tmp_path):
    import peft

    hf, path = hf_dir
    base = T5Gemma2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    made = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=7, lora_dropout=0.0,
                                                     target_modules=["q_proj", "o_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    made.eval().save_pretrained(tmp_path / "made")
    for scan in (True, False):
        ours = tg.load_peft(tg.load_hf(path, scan_layers=scan), tmp_path / "made")
        # PEFT's `q_proj` includes the SigLIP tower's, as ours does.
        assert "q_kernel" in {s.path[-1] for s, _ in lora_sites(ours)}
        ids, mask, dids, dmask, pixels = _image_batch(2)
        ref = hf_forward(made, ids, mask, dids, dmask, pixel_values=pixels).logits.numpy()
        assert np.abs(_ours(ours, ids, mask, dids, dmask, pixels) - ref).max() <= TOL


@pytest.mark.slow
def test_merging_equals_the_adapted_model_and_saves_as_a_plain_checkpoint(hf_dir, tmp_path):
    _, path = hf_dir
    adapted = _randomize(tg.apply_lora(tg.load_hf(path), rank=4, alpha=16, targets=ALL_TARGETS), seed=1)
    ids, mask, dids, dmask, pixels = _image_batch(3)
    want = _ours(adapted, ids, mask, dids, dmask, pixels)
    merged = tg.merge_lora(adapted)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam)) and not lora_sites(merged)
    np.testing.assert_allclose(_ours(merged, ids, mask, dids, dmask, pixels), want, atol=1e-4)
    tg.save_hf(merged, tmp_path / "merged")
    back = T5Gemma2ForConditionalGeneration.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert np.abs(hf_forward(back, ids, mask, dids, dmask, pixel_values=pixels).logits.numpy() - want).max() <= TOL


@pytest.mark.slow
def test_generation_on_an_adapted_model_equals_transformers_with_peft(hf_dir, tmp_path):
    """Greedy decoding through the KV cache applies the adapters without merging (a 0.3-scale
    random adapter on a 0.02-scale model changes every token, so a missed one shows)."""
    hf, path = hf_dir
    ours = _randomize(tg.apply_lora(tg.load_hf(path, text_only=True), rank=2, alpha=4), seed=4)
    tg.save_peft(ours, tmp_path / "adapter")
    theirs = _hf_with_adapter(path, tmp_path / "adapter")
    ids, mask, _, _ = text_inputs(1)
    n = 8
    with torch.no_grad():
        ref = theirs.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=n, do_sample=False).numpy()[:, 1:]
    got = np.asarray(tg.generate(ours, ids, mask, max_new_tokens=n))[:, :ref.shape[1]]
    np.testing.assert_array_equal(got, ref)
    plain = np.asarray(tg.generate(tg.load_hf(path, text_only=True), ids, mask, max_new_tokens=n))
    assert not np.array_equal(plain[:, :ref.shape[1]], ref)


@pytest.mark.slow
def test_generation_on_a_quantized_base_equals_its_dequantized_kernels(hf_dir):
    _, path = hf_dir
    ids, mask, _, _ = text_inputs(2)
    q = _randomize(tg.apply_lora(tg.quantize_base(tg.load_hf(path, text_only=True), "nf4"), rank=2), seed=5)
    got = np.asarray(tg.generate(q, ids, mask, max_new_tokens=6))
    # The same model with every quantised kernel replaced by its float value: equal tokens.
    plain = tg.load_hf(path, text_only=True)
    for site, lora in lora_sites(q):
        module = tg.adapters.module_at(q, site.path[:-1])
        target = tg.adapters.module_at(plain, site.path[:-1])
        getattr(target, site.path[-1]).set_value(getattr(module, site.path[-1]).dequantize())
    tg.apply_lora(plain, rank=2)
    for (_, a), (_, b) in zip(lora_sites(plain), lora_sites(q)):
        a.a.set_value(b.a[...])
        a.b.set_value(b.b[...])
    np.testing.assert_array_equal(got, np.asarray(tg.generate(plain, ids, mask, max_new_tokens=6)))


# Relative RMS error of one kernel and of the logits (a tiny random model of 32-wide kernels and
# perturbed norms amplifies the quantisation error through its layers).
@pytest.mark.slow
@pytest.mark.parametrize("method, kernel_tol, tol", [("int8", 0.01, 0.1), ("nf4", 0.12, 0.6)])
def test_quantized_base_stays_close_and_adapts(hf_dir, method, kernel_tol, tol):
    _, path = hf_dir
    ids, mask, dids, dmask = text_inputs(4)
    base = tg.load_hf(path, text_only=True)
    want = _ours(base, ids, mask, dids, dmask)
    q = tg.quantize_base(tg.load_hf(path, text_only=True), method)
    kinds = {type(getattr(s_module, "q")).__name__ for s_module in [q.decoder.stack.blocks.layers[0].attn]}
    assert kinds == {"QuantizedKernel"}
    got = _ours(q, ids, mask, dids, dmask)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel <= tol, rel
    w = base.decoder.stack.blocks.layers[0].mlp.up[...]
    w_q = q.decoder.stack.blocks.layers[0].mlp.up.dequantize()
    assert np.linalg.norm(w_q - w) / np.linalg.norm(w) <= kernel_tol
    adapted = _randomize(tg.apply_lora(q, rank=2, alpha=4), seed=2)
    assert np.abs(_ours(adapted, ids, mask, dids, dmask) - got).max() > 1e-3   # the adapters apply on top
    # Stored at a byte (int8) or half a byte (nf4: two codes per uint8) per weight.
    kernel = q.decoder.stack.blocks.layers[0].attn.q
    codes = kernel.codes[...]
    assert codes.dtype == (jnp.int8 if method == "int8" else jnp.uint8)
    assert codes.size == (np.prod(kernel.shape) if method == "int8" else np.prod(kernel.shape) // 2)


def test_bad_input_is_named(hf_dir, tmp_path):
    _, path = hf_dir
    model = tg.load_hf(path)
    with pytest.raises(tg.ConfigError, match=r"'qq_proj' matches no projection; module names: \['q_proj'"):
        tg.apply_lora(model, targets=["qq_proj"])
    with pytest.raises(tg.ConfigError, match="lora.rank: must be a positive integer, got 0"):
        tg.apply_lora(model, rank=0)
    with pytest.raises(tg.ConfigError, match=r"lora.rank: 64 is above the width 32 of"):
        tg.apply_lora(model, rank=64)
    text_only = tg.load_hf(path, text_only=True)
    with pytest.raises(tg.ConfigError, match="matches no projection .this model has no vision tower"):
        tg.apply_lora(text_only, targets=["fc1"])
    with pytest.raises(tg.ConfigError, match="has no adapters"):
        tg.save_peft(model, tmp_path / "none")
    # An adapter for another architecture: made on a model with a different width.
    other = build_hf_model(seed=1, encoder=dict(window=4, pattern=3, layers=5, hidden=48))
    other.save_pretrained(tmp_path / "other")
    theirs = tg.apply_lora(tg.load_hf(tmp_path / "other"), rank=2)
    tg.save_peft(theirs, tmp_path / "other_adapter")
    with pytest.raises(tg.CheckpointError, match=r"(?s)adapter shapes do not match this model.*shape mismatches "
                                                 r"\(70\).*q_proj: lora_A \(2, 48\).*and 58 more"):
        tg.load_peft(tg.load_hf(path), tmp_path / "other_adapter")
    # An adapter of 5 layers into a model of 2: its extra modules are named.
    tg.save_peft(tg.apply_lora(tg.load_hf(path), rank=2), tmp_path / "five")
    short = build_hf_model(seed=1, encoder=dict(window=4, pattern=3, layers=2))
    short.save_pretrained(tmp_path / "short")
    with pytest.raises(tg.CheckpointError, match=r"(?s)does not fit this model.*unknown keys \(42\).*"
                                                 r"decoder\.layers\.2\.mlp\.down_proj .this model has no such module"):
        tg.load_peft(tg.load_hf(tmp_path / "short"), tmp_path / "five")
    with pytest.raises(tg.CheckpointError, match="not a PEFT adapter directory"):
        tg.load_peft(tg.load_hf(path), tmp_path)

"""Hugging Face checkpoint import/export: layouts, shards, dtypes, tying, and clear errors."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import T5Gemma2ForConditionalGeneration

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointDir, CheckpointError, SafetensorsFile, write_safetensors
from hf_reference import build_hf_model, hf_forward, text_inputs

ENC = dict(window=4, pattern=3, layers=4)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = build_hf_model(seed=7, encoder=ENC)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


def _rewrite(src, dst, rename=None, extra=None, drop=()):
    """Copy an HF checkpoint directory, renaming/adding/dropping tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    st = SafetensorsFile(src / "model.safetensors")
    tensors = []
    for k in st.keys():
        if k in drop:
            continue
        v = np.array(st.get(k))
        tensors.append(((rename or (lambda x: x))(k), v.shape, v.dtype, (lambda v=v: v)))
    for k, v in (extra or {}).items():
        tensors.append((k, v.shape, v.dtype, (lambda v=v: v)))
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def _logits(model, inputs):
    ids, mask, dids, dmask = inputs
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(dids), jnp.asarray(mask), jnp.asarray(dmask)).logits)


def test_round_trip_through_transformers(hf_dir, tmp_path):
    hf, path = hf_dir
    inputs = text_inputs(0)
    ref = hf_forward(hf, *inputs).logits.numpy()
    ours = tg.load_hf(path, text_only=True)
    tg.save_hf(ours, tmp_path / "out")
    back = T5Gemma2ForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_forward(back, *inputs).logits.numpy(), ref)
    # and our own loader reads what we wrote
    np.testing.assert_allclose(_logits(tg.load_hf(tmp_path / "out", text_only=True), inputs), ref, atol=1e-4)


def test_both_key_layouts_load(hf_dir, tmp_path):
    hf, path = hf_dir
    keys = SafetensorsFile(path / "model.safetensors").keys()
    assert any(k.startswith("model.encoder.layers.") for k in keys), "transformers writes the flat layout"
    nested = _rewrite(path, tmp_path / "nested", rename=lambda k: k.replace("model.encoder.layers.", "model.encoder.text_model.layers.")
                      .replace("model.encoder.embed_tokens.", "model.encoder.text_model.embed_tokens.")
                      .replace("model.encoder.norm.", "model.encoder.text_model.norm."))
    inputs = text_inputs(1)
    a = _logits(tg.load_hf(path, text_only=True), inputs)
    b = _logits(tg.load_hf(nested, text_only=True), inputs)
    np.testing.assert_array_equal(a, b)


def test_sharded_export_loads_in_both(hf_dir, tmp_path):
    hf, path = hf_dir
    ours = tg.load_hf(path, text_only=True)
    tg.save_hf(ours, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    inputs = text_inputs(2)
    ref = hf_forward(hf, *inputs).logits.numpy()
    np.testing.assert_allclose(_logits(tg.load_hf(tmp_path / "sharded", text_only=True), inputs), ref, atol=1e-4)
    back = T5Gemma2ForConditionalGeneration.from_pretrained(tmp_path / "sharded", attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_forward(back, *inputs).logits.numpy(), ref)


def test_bf16_checkpoint(tmp_path):
    hf = build_hf_model(seed=3, encoder=ENC).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert SafetensorsFile(tmp_path / "model.safetensors").get("model.decoder.norm.weight").dtype == ml_dtypes.bfloat16
    as_f32 = tg.load_hf(tmp_path, text_only=True)
    ref = hf.model.decoder.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    q = np.asarray(as_f32.decoder.stack.blocks.layers[0].attn.q[...][0])   # layer 0 = block 0, position 0
    np.testing.assert_array_equal(q.reshape(q.shape[0], -1).T, ref)
    as_bf16 = tg.load_hf(tmp_path, dtype=jnp.bfloat16, text_only=True)
    assert as_bf16.embedder.table[...].dtype == jnp.bfloat16
    tg.save_hf(as_bf16, tmp_path / "out")
    out = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert out.get("model.decoder.norm.weight").dtype == ml_dtypes.bfloat16


def test_tied_copies_present_or_absent(hf_dir, tmp_path):
    _, path = hf_dir
    table = np.array(SafetensorsFile(path / "model.safetensors").get("model.encoder.embed_tokens.weight"))
    with_copies = _rewrite(path, tmp_path / "tied", extra={"lm_head.out_proj.weight": table,
                                                            "model.decoder.embed_tokens.weight": table})
    inputs = text_inputs(3)
    np.testing.assert_array_equal(_logits(tg.load_hf(with_copies, text_only=True), inputs),
                                  _logits(tg.load_hf(path, text_only=True), inputs))
    untied = _rewrite(path, tmp_path / "untied", extra={"lm_head.out_proj.weight": table + 1})
    with pytest.raises(CheckpointError, match="lm_head.out_proj.weight differs"):
        tg.load_hf(untied, text_only=True)


def test_tied_copies_are_compared_block_by_block(hf_dir, tmp_path, monkeypatch):
    from t5gemma2_jax.checkpoints import hf as hf_module
    monkeypatch.setattr(hf_module, "_TIED_CHUNK_BYTES", 1)          # one row at a time
    _, path = hf_dir
    table = np.array(SafetensorsFile(path / "model.safetensors").get("model.encoder.embed_tokens.weight"))
    tg.load_hf(_rewrite(path, tmp_path / "same", extra={"lm_head.out_proj.weight": table}), text_only=True)
    last_row = table.copy()
    last_row[-1, -1] += 1
    with pytest.raises(CheckpointError, match="lm_head.out_proj.weight differs"):
        tg.load_hf(_rewrite(path, tmp_path / "last", extra={"lm_head.out_proj.weight": last_row}), text_only=True)


def test_unknown_missing_and_mismatched_keys_are_listed(hf_dir, tmp_path):
    _, path = hf_dir
    extra = _rewrite(path, tmp_path / "extra", extra={"model.encoder.layers.0.mlp.bias": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"unknown keys \(1\).*mlp\.bias"):
        tg.load_hf(extra, text_only=True)
    missing = _rewrite(path, tmp_path / "missing", drop=("model.decoder.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*decoder\.layers\.1\.mlp\.up_proj"):
        tg.load_hf(missing, text_only=True)
    wrong = _rewrite(path, tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["decoder"]["intermediate_size"] = 40
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(\d+\).*mlp\.gate_proj"):
        tg.load_hf(wrong, text_only=True)


def test_vision_keys_are_refused_unless_text_only_or_loaded(hf_dir):
    _, path = hf_dir
    ckpt = CheckpointDir(path)
    assert any(k.startswith("model.encoder.vision_tower.") for k in ckpt.keys())
    tg.load_hf(path, text_only=True)      # skips them by name


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tg.load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        tg.load_hf(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="header length|corrupt"):
        tg.load_hf(tmp_path / "corrupt")
    (tmp_path / "noconfig").mkdir()
    write_safetensors(tmp_path / "noconfig" / "model.safetensors", [("a", (1,), np.float32, lambda: np.zeros(1, np.float32))])
    with pytest.raises(CheckpointError, match="no config.json"):
        tg.load_hf(tmp_path / "noconfig")


def test_truncated_safetensors_is_refused(hf_dir, tmp_path):
    _, path = hf_dir
    raw = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "model.safetensors")

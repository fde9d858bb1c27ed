"""Malformed safetensors files and indexes are refused with one-line errors naming the file, and
`save_hf` never destroys files it did not write nor the previous save when it fails."""

import json
import os
import re
import struct

import jax
import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints import hf as hf_module
from t5gemma2_jax.checkpoints.hf import MANIFEST
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointDir, CheckpointError, SafetensorsFile, write_safetensors
from hf_reference import build_hf_model

ENC = dict(window=4, pattern=3, layers=4)
F32 = np.arange(4, dtype=np.float32).tobytes()      # 16 bytes: one F32[4] tensor, or two F32[2]


def _raw(path, header, data=b"", length=None):
    """A safetensors file from a header given as a dict (dumped as JSON) or as raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _t(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _refused(fn, file, problem):
    """`fn()` raises a one-line CheckpointError naming `file` and matching `problem`."""
    with pytest.raises(CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert str(file) in msg, msg
    assert "\n" not in msg, msg
    assert re.search(problem, msg), msg
    return msg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    build_hf_model(seed=11, encoder=ENC).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(hf_dir):
    return tg.load_hf(hf_dir, text_only=True)


def _params(m):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))


def _assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, _params(a), _params(b))


# --- one malformed file, read through a checkpoint directory -------------------------------------

HEADERS = {
    "negative offsets": ({"a": _t(offsets=(-16, 0))}, F32, None, r"negative number -16"),
    "overlapping offsets": ({"a": _t(), "b": _t(shape=(2,), offsets=(8, 16))}, F32, None,
                            r"tensor 'b' has invalid data_offsets"),
    "same region twice": ({"a": _t(), "b": _t()}, F32, None, r"tensor '[ab]' has invalid data_offsets"),
    "gap before a tensor": ({"a": _t(shape=(2,), offsets=(8, 16))}, F32, None, r"tensor 'a' has invalid data_offsets"),
    "begin after end": ({"a": _t(shape=(0,), offsets=(16, 0))}, F32, None, r"tensor 'a' has invalid data_offsets"),
    # end - begin wraps round to 16 bytes in unsigned arithmetic: exactly an F32[4]
    "wrapped offsets": ({"a": _t(offsets=(2**64 - 8, 8))}, F32, None, r"tensor 'a' has invalid data_offsets"),
    "offset beyond u64": ({"a": _t(offsets=(0, 2**64 + 16))}, F32, None, r"corrupt safetensors header: invalid type"),
    "truncated data": ({"a": _t()}, F32[:8], None, r"truncated"),
    "trailing bytes": ({"a": _t(shape=(2,), offsets=(0, 8))}, F32, None,
                       r"data_offsets do not end where the file does"),
    "byte size not shape x dtype": ({"a": _t(shape=(3,))}, F32, None,
                                    r"byte size .* does not match its shape and dtype"),
    "too short": (b"", b"", -1, r"too short to be a safetensors file"),
    "length beyond the file": ({"a": _t()}, F32, 1000, r"header length 1000 exceeds the file size"),
    "header length zero": (b"", b"", 0, r"corrupt safetensors header"),
    "not JSON": (b"{not json", b"", None, r"corrupt safetensors header: key must be a string"),
    "not UTF-8": (b'{"\xff\xfe": 1}', b"", None, r"corrupt safetensors header: not valid UTF-8"),
    "not an object": (b"[1, 2]", b"", None, r"corrupt safetensors header: invalid type: sequence"),
    "tensor entry not an object": ({"a": 5}, F32, None, r"corrupt safetensors header: invalid type: integer `5`"),
    "missing dtype": ({"a": {"shape": [4], "data_offsets": [0, 16]}}, F32, None, r"missing field `dtype`"),
    "missing shape": ({"a": {"dtype": "F32", "data_offsets": [0, 16]}}, F32, None, r"missing field `shape`"),
    "missing data_offsets": ({"a": {"dtype": "F32", "shape": [4]}}, F32, None, r"missing field `data_offsets`"),
    "dtype not a string": ({"a": _t(dtype=5)}, F32, None, r"invalid type: integer `5`"),
    "shape not a list": ({"a": {**_t(), "shape": "4"}}, F32, None, r'invalid type: string "4", expected a sequence'),
    "shape of floats": ({"a": {**_t(), "shape": [4.0]}}, F32, None, r"invalid type: floating point `4(\.0)?`"),
    "negative shape": ({"a": {**_t(), "shape": [-4]}}, F32, None, r"negative number -4"),
    "data_offsets not a list": ({"a": {**_t(), "data_offsets": "0,16"}}, F32, None, r'invalid type: string "0,16"'),
    "three data_offsets": ({"a": {**_t(), "data_offsets": [0, 16, 16]}}, F32, None, r"invalid length 3"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "a": _t()}, F32, None, r"invalid type: integer `1`"),
    "unknown dtype": ({"a": _t(dtype="Q7")}, F32, None, r"unknown dtype 'Q7'"),
    "dtype numpy cannot hold": ({"a": _t(dtype="F8_E4M3", offsets=(0, 4))}, F32[:4], None,
                                r"unsupported dtype F8_E4M3"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_file_is_refused(case, tmp_path):
    header, data, length, problem = HEADERS[case]
    file = tmp_path / "model.safetensors"
    if length == -1:
        file.write_bytes(b"\x01\x02\x03")
    else:
        _raw(file, header, data, length)
    _refused(lambda: CheckpointDir(tmp_path), file, problem)
    _refused(lambda: SafetensorsFile(file), file, problem)


def test_a_well_formed_hand_made_file_reads(tmp_path):
    """The cases above fail for what they break, not for how they are built."""
    bf16 = np.array([1.0, -2.0], dtype="bfloat16").tobytes()
    header = {"__metadata__": {"format": "pt"}, "a": _t(), "b": _t("BF16", (2,), (16, 20))}
    st = SafetensorsFile(_raw(tmp_path / "ok.safetensors", header, F32 + bf16))
    np.testing.assert_array_equal(st.get("a"), np.arange(4, dtype=np.float32))
    assert st.get("b").dtype == np.dtype("bfloat16") and st.get("b").tolist() == [1.0, -2.0]
    assert st.dtype("b") == "BF16" and st.metadata == {"format": "pt"}
    np.testing.assert_array_equal(st.get_rows("a", 1, 3), [1.0, 2.0])


def test_a_tensor_in_two_files_is_ambiguous(tmp_path):
    _raw(tmp_path / "a.safetensors", {"w": _t()}, F32)
    _raw(tmp_path / "b.safetensors", {"w": _t()}, F32)
    _refused(lambda: CheckpointDir(tmp_path), tmp_path, r"tensor 'w' is in both a.safetensors and b.safetensors")


# --- declared dtypes against the model ------------------------------------------------------------

def _redeclare(src, dst, key, dtype):
    """Copy a checkpoint, changing only the dtype `key`'s header entry declares (the bytes stay)."""
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header[key]["dtype"] == "F32"
    header[key]["dtype"] = dtype
    _raw(dst / "model.safetensors", json.dumps(header).encode(), raw[8 + n:])
    return dst


def test_int_declared_over_float_data_is_refused(hf_dir, tmp_path):
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    bad = _redeclare(hf_dir, tmp_path / "i32", key, "I32")
    with pytest.raises(CheckpointError) as info:
        tg.load_hf(bad, text_only=True)
    msg = str(info.value)
    assert re.search(rf"dtype mismatches \(1\): \['{re.escape(key)}: stored as I32 in model.safetensors, expected a "
                     r"floating type \(F32, F16, BF16 or F64\) for a float32 parameter'\]", msg), msg
    assert str(bad) in msg


def test_int_tied_copy_is_refused(hf_dir, tmp_path):
    st = SafetensorsFile(hf_dir / "model.safetensors")
    table = np.array(st.get("model.encoder.embed_tokens.weight"))
    dst = tmp_path / "tied"
    dst.mkdir()
    (dst / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    tensors = [(k, st.shape(k), st.get(k).dtype, (lambda k=k: np.array(st.get(k)))) for k in st.keys()]
    tensors.append(("lm_head.out_proj.weight", table.shape, np.int32, lambda: table.view(np.int32)))
    write_safetensors(dst / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"lm_head\.out_proj\.weight: stored as I32"):
        tg.load_hf(dst, text_only=True)


def test_float_to_float_still_converts(hf_dir, tmp_path):
    st = SafetensorsFile(hf_dir / "model.safetensors")
    key = "model.decoder.norm.weight"
    dst = tmp_path / "mixed"
    dst.mkdir()
    (dst / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    write_safetensors(dst / "model.safetensors",
                      [(k, st.shape(k), np.float16 if k == key else st.get(k).dtype,
                        (lambda k=k: np.array(st.get(k)))) for k in st.keys()])
    assert SafetensorsFile(dst / "model.safetensors").dtype(key) == "F16"
    m = tg.load_hf(dst, text_only=True)
    np.testing.assert_array_equal(np.asarray(m.decoder.norm.scale[...]),
                                  np.array(st.get(key)).astype(np.float16).astype(np.float32))


# --- indexes --------------------------------------------------------------------------------------

def _sharded(tmp_path, weight_map, shards):
    """A directory with an index (`weight_map`, or raw bytes) and shards {name: {key: F32[4] value}}."""
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    for name, keys in shards.items():
        write_safetensors(d / name, [(k, (4,), np.float32, (lambda v=v: np.full(4, v, np.float32)))
                                     for k, v in keys.items()])
    raw = weight_map if isinstance(weight_map, bytes) else json.dumps({"weight_map": weight_map}).encode()
    (d / "model.safetensors.index.json").write_bytes(raw)
    return d, d / "model.safetensors.index.json"


def test_good_index_reads(tmp_path):
    d, _ = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"},
                    {"s1.safetensors": {"a": 1.0}, "s2.safetensors": {"b": 2.0}})
    ckpt = CheckpointDir(d)
    assert sorted(ckpt.keys()) == ["a", "b"] and ckpt.get("b").tolist() == [2.0] * 4


def test_index_path_outside_the_directory_is_refused(tmp_path):
    write_safetensors(tmp_path / "outside.safetensors", [("b", (4,), np.float32, lambda: np.zeros(4, np.float32))])
    _, index = _sharded(tmp_path, {"a": "s1.safetensors", "b": "../outside.safetensors"},
                        {"s1.safetensors": {"a": 1.0}})
    _refused(lambda: CheckpointDir(tmp_path / "ckpt"), index, r"shard path '\.\./outside\.safetensors' leads outside")


def test_index_absolute_path_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    write_safetensors(outside, [("b", (4,), np.float32, lambda: np.zeros(4, np.float32))])
    _, index = _sharded(tmp_path, {"a": "s1.safetensors", "b": str(outside)}, {"s1.safetensors": {"a": 1.0}})
    _refused(lambda: CheckpointDir(tmp_path / "ckpt"), index, r"is not a file name inside")


def test_index_symlink_outside_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    write_safetensors(outside, [("b", (4,), np.float32, lambda: np.zeros(4, np.float32))])
    d, index = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"}, {"s1.safetensors": {"a": 1.0}})
    (d / "s2.safetensors").symlink_to(outside)
    _refused(lambda: CheckpointDir(d), index, r"shard 's2\.safetensors' is a link to .*, outside the checkpoint")


def test_hub_cache_snapshot_links_are_followed(model, tmp_path):
    """How `huggingface_hub` lays out a download: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    saved = tmp_path / "saved"
    tg.save_hf(model, saved, max_shard_size=20_000)
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for n, f in enumerate(sorted(saved.iterdir())):
        os.replace(f, repo / "blobs" / f"blob{n}")
        (snap / f.name).symlink_to(f"../../blobs/blob{n}")
    _assert_same_params(tg.load_hf(snap, text_only=True), model)


def test_missing_shard_is_named(tmp_path):
    _, index = _sharded(tmp_path, {"a": "s1.safetensors", "b": "model-00002-of-00002.safetensors"},
                        {"s1.safetensors": {"a": 1.0}})
    _refused(lambda: CheckpointDir(tmp_path / "ckpt"), index,
             r"shard model-00002-of-00002\.safetensors listed in the index is missing")


def test_key_missing_from_its_shard_is_named(tmp_path):
    _, index = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"}, {"s1.safetensors": {"a": 1.0}})
    _refused(lambda: CheckpointDir(tmp_path / "ckpt"), index,
             r"tensor 'b' is listed in shard s1\.safetensors but that file does not hold it")


@pytest.mark.parametrize("raw,problem", [
    (b'{"weight_map": ', r"not valid JSON"),
    (b'\xff{"weight_map": {}}', r"not valid UTF-8"),
    (b'[1]', r'needs a "weight_map" object .*, the file holds a list'),
    (b'{"metadata": {}}', r'needs a "weight_map" object .*, found none'),
    (b'{"weight_map": ["a"]}', r'needs a "weight_map" object .*, got a list'),
    (b'{"weight_map": {"a": 3}}', r"weight_map values must be shard file names .* 'a': 3"),
    (b'{"weight_map": {}}', r"the weight_map lists no shards"),
])
def test_malformed_index_is_refused(tmp_path, raw, problem):
    _, index = _sharded(tmp_path, raw, {"s1.safetensors": {"a": 1.0}})
    _refused(lambda: CheckpointDir(tmp_path / "ckpt"), index, problem)


# --- save_hf --------------------------------------------------------------------------------------

def _listing(path):
    return sorted(os.listdir(path))


def test_save_refuses_foreign_weights_and_leaves_them(model, tmp_path):
    d = tmp_path / "theirs"
    d.mkdir()
    write_safetensors(d / "model.safetensors", [("x", (4,), np.float32, lambda: np.ones(4, np.float32))])
    (d / "README.md").write_text("mine")
    before = (d / "model.safetensors").read_bytes()
    _refused(lambda: tg.save_hf(model, d), d,
             r"would overwrite or remove model\.safetensors, which no earlier save_hf wrote there; "
             r"save into another directory or remove them first")
    assert (d / "model.safetensors").read_bytes() == before
    assert _listing(d) == ["README.md", "model.safetensors"] and _listing(tmp_path) == ["theirs"]


def test_save_refuses_foreign_files_next_to_its_own(model, tmp_path):
    d = tmp_path / "ckpt"
    tg.save_hf(model, d)
    write_safetensors(d / "adapter.safetensors", [("x", (4,), np.float32, lambda: np.ones(4, np.float32))])
    _refused(lambda: tg.save_hf(model, d, max_shard_size=20_000), d, r"overwrite or remove adapter\.safetensors")
    (d / MANIFEST).write_text("{broken")
    _refused(lambda: tg.save_hf(model, d), d, rf"{re.escape(MANIFEST)} \(unreadable\)")


def test_save_over_its_own_save_leaves_exactly_the_new_files(model, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"user tokenizer")
    single = ["config.json", "model.safetensors", MANIFEST, "tokenizer.model"]

    tg.save_hf(model, d)
    assert _listing(d) == single
    tg.save_hf(model, d, max_shard_size=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert _listing(d) == sorted(["config.json", "model.safetensors.index.json", MANIFEST, "tokenizer.model", *shards])
    assert json.loads((d / MANIFEST).read_text())["files"] == sorted(["config.json", "model.safetensors.index.json",
                                                                      *shards])
    _assert_same_params(tg.load_hf(d, text_only=True), model)

    tg.save_hf(model, d)
    assert _listing(d) == single
    assert (d / "tokenizer.model").read_bytes() == b"user tokenizer"
    _assert_same_params(tg.load_hf(d, text_only=True), model)
    assert _listing(tmp_path) == ["ckpt"]


def test_failed_save_keeps_the_previous_one(model, tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    tg.save_hf(model, d)
    before = {n: (d / n).read_bytes() for n in _listing(d)}
    real, calls = hf_module.write_safetensors, []

    def first_then_fail(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("disk full")
        real(path, tensors, metadata)

    monkeypatch.setattr(hf_module, "write_safetensors", first_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tg.save_hf(model, d, max_shard_size=20_000)
    assert len(calls) == 2
    assert {n: (d / n).read_bytes() for n in _listing(d)} == before
    assert _listing(tmp_path) == ["ckpt"]                  # no temporary directory left behind
    _assert_same_params(tg.load_hf(d, text_only=True), model)

    with pytest.raises(OSError, match="disk full"):        # a first save that fails leaves nothing at all
        calls.clear()
        tg.save_hf(model, tmp_path / "fresh", max_shard_size=20_000)
    assert _listing(tmp_path) == ["ckpt"]


def test_a_save_stopped_while_renaming_is_repaired_by_the_next(model, tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    tg.save_hf(model, d)
    real, moved = os.replace, []

    def stop_after_one(src, dst):
        if ".saving" in str(src) and ".saving" not in str(dst):   # staging -> checkpoint, not within staging
            moved.append(dst)
            if len(moved) == 2:
                raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", stop_after_one)
    with pytest.raises(OSError, match="killed"):
        tg.save_hf(model, d, max_shard_size=20_000)
    monkeypatch.setattr(os, "replace", real)
    assert "model-00001-of-" in " ".join(_listing(d))                  # the mixed state this guards
    tg.save_hf(model, d)
    assert _listing(d) == ["config.json", "model.safetensors", MANIFEST]
    _assert_same_params(tg.load_hf(d, text_only=True), model)
    assert _listing(tmp_path) == ["ckpt"]


def test_adaptation_refuses_integer_weights_for_float_parameters(tmp_path):
    """The same dtype rule as load_hf, through the shared triage: an I32 tensor over F32 bytes in a
    Gemma 3 source is named, not cast into garbage weights."""
    from t5gemma2_jax.checkpoints import adapt_gemma3

    cfg = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
           "sliding_window": 4, "layer_types": ["full_attention"], "query_pre_attn_scalar": 8}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,),
              "model.layers.0.input_layernorm.weight": (16,), "model.layers.0.post_attention_layernorm.weight": (16,),
              "model.layers.0.pre_feedforward_layernorm.weight": (16,),
              "model.layers.0.post_feedforward_layernorm.weight": (16,),
              "model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.self_attn.k_proj.weight": (8, 16),
              "model.layers.0.self_attn.v_proj.weight": (8, 16), "model.layers.0.self_attn.o_proj.weight": (16, 16),
              "model.layers.0.self_attn.q_norm.weight": (8,), "model.layers.0.self_attn.k_norm.weight": (8,),
              "model.layers.0.mlp.gate_proj.weight": (32, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
              "model.layers.0.mlp.down_proj.weight": (16, 32)}
    tensors = [(k, s, np.dtype(np.int32 if "up_proj" in k else np.float32),
                (lambda s=s, k=k: rng.normal(size=s).astype(np.int32 if "up_proj" in k else np.float32)))
               for k, s in shapes.items()]
    write_safetensors(tmp_path / "model.safetensors", tensors)
    assert SafetensorsFile(tmp_path / "model.safetensors").dtype("model.layers.0.mlp.up_proj.weight") == "I32"
    with pytest.raises(CheckpointError, match=r"dtype mismatches \(1\).*up_proj\.weight: stored as I32"):
        adapt_gemma3(tmp_path, text_only=True, image_token_id=6, boi_token_id=4, eoi_token_id=5)

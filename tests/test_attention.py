"""Attention backends equal the dense reference (values and gradients) on every mask kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.ops import backends
from t5gemma2_jax.ops.backends import attend, auto
from t5gemma2_jax.ops.masks import MaskInfo, bidirectional_window, causal_window, dense_mask

B, T, S, H, K, d = 2, 37, 29, 4, 2, 8


def _case(kind, rng):
    pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    if kind.startswith("encoder"):
        seg = np.ones((B, T), np.int32)
        kseg = seg.copy()
        kseg[1, -5:] = 0                                               # right padding
        window = bidirectional_window(6) if kind == "encoder_local" else None
        return MaskInfo(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(kseg), jnp.asarray(pos), window=window), T
    if kind == "packed":                                                # two segments + padding, per-segment positions
        seg = np.array([[1] * 20 + [2] * 14 + [0] * 3] * B, np.int32)
        ppos = np.concatenate([np.arange(20), np.arange(14), np.zeros(3)]).astype(np.int32)
        ppos = np.broadcast_to(ppos, (B, T))
        return MaskInfo(jnp.asarray(seg), jnp.asarray(ppos), jnp.asarray(seg), jnp.asarray(ppos),
                        window=bidirectional_window(5)), T
    dseg = np.ones((B, T), np.int32)
    dseg[1, -3:] = 0
    eseg = np.ones((B, S), np.int32)
    eseg[0, -4:] = 0
    window = causal_window(5) if kind == "decoder_local" else None
    return MaskInfo(jnp.ones((B, T), jnp.int32), jnp.asarray(pos), jnp.asarray(np.concatenate([dseg, eseg], 1)),
                    jnp.asarray(np.concatenate([pos, np.zeros((B, S), np.int32)], 1)), causal=True, window=window,
                    cross_start=T), T + S


def _inputs(kind, seed):
    """(mask, q, k, v, has_keys) for a mask kind; rows with no visible key are unspecified."""
    rng = np.random.default_rng(seed)
    mask, n = _case(kind, rng)
    q = jnp.asarray(rng.normal(size=(B, T, H, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, n, K, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, n, K, d)), jnp.float32)
    return mask, q, k, v, np.asarray(dense_mask(mask)).any(-1)


def _assert_same_grads(f, g, q, k, v, has_keys):
    """Gradients of the rows that matter (those with a visible key) agree."""
    w = jnp.asarray(has_keys[..., None, None], jnp.float32)
    ga = jax.grad(lambda *x: (f(*x) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *x: (g(*x) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


@pytest.mark.parametrize("kind, block", [("encoder_local", 8), ("encoder_global", 16), ("packed", 8),
                                         ("decoder_local", 8), ("decoder_global", 16)])
def test_blockwise_equals_dense(kind, block):
    mask, q, k, v, has_keys = _inputs(kind, 0)
    f = lambda backend: (lambda q, k, v: attend(q, k, v, mask, scale=0.3, backend=backend, block_size=block))  # noqa: E731
    a, b = f("dense")(q, k, v), f("blockwise")(q, k, v)
    np.testing.assert_allclose(np.asarray(b)[has_keys], np.asarray(a)[has_keys], atol=1e-5)
    _assert_same_grads(f("dense"), f("blockwise"), q, k, v, has_keys)


@pytest.mark.parametrize("kind", ["encoder_local", "encoder_global", "packed", "decoder_local", "decoder_global"])
def test_splash_interpret_mode_equals_dense(kind):
    """The TPU kernel path, run by Pallas' interpreter on CPU (values, and gradients once)."""
    mask, q, k, v, has_keys = _inputs(kind, 1)
    f = lambda backend: (lambda q, k, v: attend(q, k, v, mask, scale=0.3, backend=backend, block_size=128))  # noqa: E731
    out = np.asarray(f("splash")(q, k, v))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[has_keys], np.asarray(f("dense")(q, k, v))[has_keys], atol=1e-5)
    if kind == "decoder_local":
        _assert_same_grads(f("dense"), f("splash"), q, k, v, has_keys)


@pytest.mark.slow
def test_blockwise_model_matches_dense_model():
    cfg = tg.preset("tiny", with_vision=False)
    dense = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    blockwise = tg.T5Gemma2(cfg.replace(attention_backend="blockwise", attention_block_size=8), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(7, 512, (2, 30))
    dids = np.random.default_rng(1).integers(7, 512, (2, 19))
    np.testing.assert_allclose(np.asarray(blockwise(ids, dids).logits), np.asarray(dense(ids, dids).logits), atol=1e-5)


@pytest.mark.parametrize("kind", ["encoder_local", "packed", "decoder_local", "decoder_global"])
def test_cudnn_call_equals_dense(kind):
    """The exact `jax.nn.dot_product_attention` call the cuDNN backend makes (mask, GQA, scale),
    run through its XLA implementation, which has the same semantics and runs anywhere."""
    from t5gemma2_jax.ops.backends.cudnn import attention as cudnn_attention

    mask, q, k, v, has_keys = _inputs(kind, 2)
    dense = lambda *x: attend(*x, mask, scale=0.3)  # noqa: E731
    via_dpa = lambda *x: cudnn_attention(*x, mask, 0.3, 8, implementation="xla")  # noqa: E731
    np.testing.assert_allclose(np.asarray(via_dpa(q, k, v))[has_keys], np.asarray(dense(q, k, v))[has_keys],
                               atol=1e-5)
    _assert_same_grads(dense, via_dpa, q, k, v, has_keys)


def test_cudnn_support_rules_and_fallback():
    from t5gemma2_jax.ops.backends.cudnn import cudnn_unsupported_reason

    bf = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    assert cudnn_unsupported_reason(bf(1, 64, 8, 256), bf(1, 128, 4, 256), 9.0) is None       # H100, Gemma 3 head dim
    assert "head dim 256" in cudnn_unsupported_reason(bf(1, 64, 8, 256), bf(1, 128, 4, 256), 8.0)  # A100: d <= 128
    assert cudnn_unsupported_reason(bf(1, 64, 8, 128), bf(1, 128, 4, 128), 8.0) is None
    assert "dtype float32" in cudnn_unsupported_reason(jnp.zeros((1, 64, 8, 128)), jnp.zeros((1, 64, 4, 128)), 9.0)
    assert "odd sequence length" in cudnn_unsupported_reason(bf(1, 63, 8, 128), bf(1, 64, 4, 128), 9.0)
    assert cudnn_unsupported_reason(bf(1, 64, 8, 128), bf(1, 64, 4, 128), None) == "no CUDA device"
    # Off GPU the backend runs blockwise, which equals dense.
    mask, q, k, v, has_keys = _inputs("decoder_local", 3)
    got = attend(q, k, v, mask, scale=0.3, backend="cudnn", block_size=8)
    want = attend(q, k, v, mask, scale=0.3)
    np.testing.assert_allclose(np.asarray(got)[has_keys], np.asarray(want)[has_keys], atol=1e-5)


@pytest.mark.parametrize("backend, block", [("blockwise", 8), ("cudnn", 8), ("splash", 128), ("auto", 16)])
def test_backend_model_generates_like_dense(backend, block, monkeypatch):
    """The encoder runs the backend (splash: interpret mode; auto: blockwise, its threshold lowered);
    cached decode steps, whose queries do not line up with the cached keys (ring buffer), take the
    dense path. More new tokens than the window. Tokens and step logits equal the dense model's."""
    monkeypatch.setattr(auto, "BLOCKWISE_MIN_KEYS", 2)
    cfg = tg.preset("tiny", with_vision=False).replace(scan_layers=False)
    cfg = cfg.replace(encoder=cfg.encoder.replace(num_layers=2, layer_types=("sliding_attention", "full_attention")),
                      decoder=cfg.decoder.replace(num_layers=2, layer_types=("sliding_attention", "full_attention")))
    dense = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    other = tg.T5Gemma2(cfg.replace(attention_backend=backend, attention_block_size=block), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(7, 512, (2, 12)))
    want, want_scores = tg.generate(dense, ids, max_new_tokens=12, return_scores=True)
    got, scores = tg.generate(other, ids, max_new_tokens=12, return_scores=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), atol=1e-5)


@pytest.mark.slow
def test_a_backend_registered_by_name_runs_every_layer():
    """Adding a backend is one function and one registration; configs then accept its name."""
    from t5gemma2_jax.ops import backends
    from t5gemma2_jax.ops.backends import dense

    calls = []

    def counted(q, k, v, mask, scale, block_size=512):
        calls.append(q.shape)
        return dense.attention(q, k, v, mask, scale, block_size)

    with pytest.raises(tg.ConfigError, match=r"attention_backend: 'counted' not in \('auto', 'dense', 'blockwise'"):
        tg.preset("tiny", attention_backend="counted")
    backends.register("counted", counted)
    try:
        cfg = tg.preset("tiny", with_vision=False)
        ids = jnp.asarray(np.random.default_rng(0).integers(7, 512, (1, 10)))
        forward = nnx.jit(lambda m, x: m(x, x[:, :4]).logits)
        want = forward(tg.T5Gemma2(cfg, rngs=nnx.Rngs(0)), ids)
        got = forward(tg.T5Gemma2(cfg.replace(attention_backend="counted"), rngs=nnx.Rngs(0)), ids)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert len(calls) >= 4        # the scanned block traces once; the remainder layers once each
    finally:
        backends.BACKENDS.pop("counted")


def test_auto_is_the_default():
    assert tg.preset("tiny").attention_backend == "auto"
    assert tg.T5Gemma2Config.__dataclass_fields__["attention_backend"].default == "auto"


def _shapes(T, S, *, d=256, dtype=jnp.float32, B=1, H=4, K=1):
    return jax.ShapeDtypeStruct((B, T, H, d), dtype), jax.ShapeDtypeStruct((B, S, K, d), dtype)


def _mask(T, S, **kw):
    seg = jnp.zeros((1, T), jnp.int32)
    return MaskInfo(seg, seg, jnp.zeros((1, S), jnp.int32), jnp.zeros((1, S), jnp.int32), **kw)


N = auto.BLOCKWISE_MIN_KEYS
ENCODER_LOCAL = dict(window=bidirectional_window(512))
DECODER = dict(causal=True, window=causal_window(512))          # merged: cross_start added per case


@pytest.mark.parametrize("platform, T, S, mask, dtype, d, block, want", [
    # CPU: dense below the measured crossover, blockwise from it on (encoder, merged decoder keys).
    ("cpu", N // 2, N // 2, ENCODER_LOCAL, jnp.float32, 256, 512, "dense"),
    ("cpu", N, N, ENCODER_LOCAL, jnp.float32, 256, 512, "blockwise"),
    ("cpu", 256, 256 + 8192, DECODER, jnp.float32, 256, 512, "blockwise"),
    ("cpu", 128, 128 + N // 4, DECODER, jnp.bfloat16, 256, 512, "dense"),
    # TPU: splash wherever its kernel takes the call, otherwise the CPU rule.
    ("tpu", 512, 512, ENCODER_LOCAL, jnp.bfloat16, 256, 512, "splash"),
    ("tpu", 256, 256 + 8192, DECODER, jnp.float32, 256, 512, "splash"),
    ("tpu", 64, 64, {}, jnp.bfloat16, 256, 512, "dense"),                    # below one 128-row tile
    ("tpu", 2 * N, 2 * N, {}, jnp.bfloat16, 16, 512, "blockwise"),            # head dim 16
    ("tpu", 2 * N, 2 * N, {}, jnp.bfloat16, 256, 8, "blockwise"),             # block size 8
    ("tpu", 512, 512, dict(causal=True, window=(4, 4)), jnp.bfloat16, 256, 512, "dense"),   # no such splash mask
    ("tpu", 512, 1024, dict(cross_start=512), jnp.bfloat16, 256, 512, "blockwise"),         # self part not causal
    # GPU (an H100): cuDNN for bf16 within its limits, otherwise the CPU rule.
    ("gpu", 512, 512, ENCODER_LOCAL, jnp.bfloat16, 256, 512, "cudnn"),
    ("gpu", 2 * N, 2 * N, ENCODER_LOCAL, jnp.float32, 256, 512, "blockwise"),
    ("gpu", 64, 64, {}, jnp.float32, 256, 512, "dense"),
    ("gpu", 63, 64, {}, jnp.bfloat16, 256, 512, "dense"),                     # odd length
    ("gpu", 32768, 32768, ENCODER_LOCAL, jnp.bfloat16, 256, 512, "blockwise"),  # a 2 GiB cuDNN mask
])
def test_auto_choice_per_platform_and_length(platform, T, S, mask, dtype, d, block, want, monkeypatch):
    from t5gemma2_jax.ops.backends import cudnn

    monkeypatch.setattr(cudnn, "gpu_compute_capability", lambda: 9.0)
    if mask.get("causal") and mask.get("window") and S > T:
        mask = dict(mask, cross_start=T)
    q, k = _shapes(T, S, d=d, dtype=dtype)
    assert auto.choose(q, k, _mask(T, S, **mask), block, platform=platform) == want


def _recording(monkeypatch, *names):
    """Replace backends `names` by dense, recording which ran."""
    ran = []
    for name in names:
        monkeypatch.setitem(backends.BACKENDS, name,
                            lambda *a, name=name, **kw: ran.append(name) or backends.get("dense")(*a, **kw))
    return ran


def test_auto_picks_by_the_devices_compiled_for_not_the_host(monkeypatch):
    """AOT compilation for a TPU topology traces on a CPU host under the topology's mesh
    (`Trainer.build(cfg, devices=topology devices)`): the mesh's platform decides, here with fake
    TPU device objects behind a real `Mesh`; without a mesh, the host's backend decides."""
    class FakeTpu:
        platform, device_kind, num_cores, id, process_index = "tpu", "TPU v5p", 1, 0, 0

    mesh = jax.sharding.Mesh(np.array([FakeTpu()], dtype=object).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    ran = _recording(monkeypatch, "splash", "blockwise")
    q, k = jnp.zeros((1, 256, 4, 256)), jnp.zeros((1, 256, 1, 256))
    mask = _mask(256, 256, window=bidirectional_window(8))
    f = lambda q, k: attend(q, k, k, mask, scale=0.1, backend="auto")  # noqa: E731
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        jax.make_jaxpr(f)(q, k)
        assert backends.target_platform() == "tpu"
    assert ran == ["splash"]
    jax.make_jaxpr(f)(q, k)
    assert ran == ["splash"] and backends.target_platform() == jax.default_backend() == "cpu"


def test_splash_runs_its_kernel_when_compiled_for_tpu(monkeypatch):
    """Splash's interpret mode (for tests off TPU) follows the same target platform."""
    from t5gemma2_jax.ops.backends import splash

    seen = []
    monkeypatch.setattr(splash, "_local_splash", lambda q, *a, interpret, **kw: seen.append(interpret) or q)
    q = jnp.zeros((1, 128, 4, 128))
    mask = _mask(128, 128)
    splash.attention(q, q[:, :, :1], q[:, :, :1], mask, 0.1, 128)
    # Auto axes, as the trainer's meshes have (jax 0.11 made Explicit the default of AbstractMesh).
    tpu = jax.sharding.AbstractMesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                                    abstract_device=jax.sharding.AbstractDevice("TPU v5p", 1, "tpu"))
    with jax.sharding.use_abstract_mesh(tpu):
        jax.make_jaxpr(lambda q: splash.attention(q, q[:, :, :1], q[:, :, :1], mask, 0.1, 128))(q)
    assert seen == [True, False]


def test_auto_leaves_cached_decoding_to_dense(monkeypatch):
    ran = _recording(monkeypatch, "blockwise", "splash", "cudnn")
    monkeypatch.setattr(auto, "BLOCKWISE_MIN_KEYS", 1)
    mask, q, k, v, _ = _inputs("decoder_local", 4)
    step = MaskInfo(mask.q_segment_ids[:, :1], mask.q_positions[:, :1], mask.kv_segment_ids, mask.kv_positions,
                    causal=True, window=mask.window, cross_start=mask.cross_start)
    want = attend(q[:, :1], k, v, step, scale=0.3)
    np.testing.assert_array_equal(np.asarray(attend(q[:, :1], k, v, step, scale=0.3, backend="auto")), np.asarray(want))
    assert ran == []


@pytest.mark.parametrize("kind", ["encoder_local", "encoder_global", "packed", "decoder_local", "decoder_global"])
def test_auto_equals_dense(kind, monkeypatch):
    """Values and gradients on every mask kind, past the length threshold (lowered to these shapes;
    below it auto is dense itself)."""
    mask, q, k, v, has_keys = _inputs(kind, 5)
    assert auto.choose(q, k, mask, 8) == "dense"
    monkeypatch.setattr(auto, "BLOCKWISE_MIN_KEYS", 16)
    assert auto.choose(q, k, mask, 8) == "blockwise"
    f = lambda backend: (lambda q, k, v: attend(q, k, v, mask, scale=0.3, backend=backend, block_size=8))  # noqa: E731
    np.testing.assert_allclose(np.asarray(f("auto")(q, k, v))[has_keys], np.asarray(f("dense")(q, k, v))[has_keys],
                               atol=1e-5)
    _assert_same_grads(f("dense"), f("auto"), q, k, v, has_keys)

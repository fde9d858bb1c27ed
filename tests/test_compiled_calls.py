"""Plain calls of the model (`model(...)`, `encode`, `decode`) and of `score` run one compiled program
per input shape; calls inside a transformation run the traced code as it is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.generation import score
from t5gemma2_jax.ops import backends
from t5gemma2_jax.ops.backends import dense
from t5gemma2_jax.ops.compiled import _program
from t5gemma2_jax.ops.rng import dropout_key
from t5gemma2_jax.sharding import axis_rules

TRACES: list[tuple] = []


def _counted(q, k, v, mask, scale, block_size=512):
    """Dense attention that records each time it is traced (or run op by op)."""
    TRACES.append(q.shape)
    return dense.attention(q, k, v, mask, scale, block_size)


@pytest.fixture
def traces():
    """The traces of a counting backend, with no program compiled before the test."""
    backends.register("counted_traces", _counted)
    _program.cache_clear()
    TRACES.clear()
    yield TRACES
    backends.BACKENDS.pop("counted_traces")
    _program.cache_clear()


def _config(**kw):
    """Two layers per tower (one local, one global), unscanned: small programs that compile fast."""
    cfg = tg.preset("tiny", with_vision=False).replace(scan_layers=False, attention_backend="counted_traces")
    t = cfg.encoder.replace(num_layers=2, layer_types=("sliding_attention", "full_attention"))
    return cfg.replace(encoder=t, decoder=t, **kw)


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(7, 512, shape).astype(np.int32)


def _perturb(model, seed):
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                for x, k in zip(leaves, keys)]))


def test_a_plain_call_compiles_once_per_shape_and_not_per_parameter_value(traces):
    model = tg.T5Gemma2(_config(), rngs=nnx.Rngs(0))
    ids, dids = _ids((2, 12)), _ids((2, 6), 1)
    out = model(ids, dids)
    assert isinstance(out, tg.ModelOutput) and out.logits.shape == (2, 6, 512) and out.encoder_states.shape == (2, 12, 64)
    per_trace = len(traces)
    assert per_trace == 4                        # 2 encoder + 2 decoder layers
    model(ids, dids)
    model(ids + 1, dids)                         # new values, same shapes
    assert len(traces) == per_trace
    model(ids, dids[:, :4])                      # a new decoder length compiles once more
    model(ids, dids[:, :4])
    assert len(traces) == 2 * per_trace
    model(ids.tolist(), dids.tolist())           # nested lists are arrays of the first shape
    assert len(traces) == 2 * per_trace
    with axis_rules((("embed", None),)):         # `constrain` reads the rules while tracing
        model(ids, dids)
    assert len(traces) == 3 * per_trace

    before = np.asarray(model(ids, dids).logits)
    _perturb(model, 1)
    after = np.asarray(model(ids, dids).logits)
    assert np.abs(after - before).max() > 1e-3
    assert len(traces) == 3 * per_trace           # new parameters, the same program
    traced = nnx.jit(lambda m: m(ids, dids).logits)(model)
    np.testing.assert_allclose(after, np.asarray(traced), atol=1e-5)


def test_encode_decode_and_score_compile_once_per_shape(traces):
    model = tg.T5Gemma2(_config(), rngs=nnx.Rngs(0))
    ids, dids, mask = _ids((2, 10)), _ids((2, 5), 1), np.ones((2, 10), np.int32)
    mask[1, -3:] = 0
    enc, seg = model.encode(ids, mask)
    model.encode(ids, mask)
    assert len(traces) == 2
    logits = model.decode(dids, enc, seg)
    model.decode(dids, enc, seg)
    assert len(traces) == 4
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids, dids, mask).logits), atol=1e-5)
    assert len(traces) == 8

    ll = score(model, ids, dids, mask)
    assert len(traces) == 12
    per_token = score(model, ids, dids, mask, per_token=True)     # a static argument: its own program
    assert len(traces) == 16 and per_token.shape == (2, 5)
    score(model, ids, dids, mask)
    score(model, ids, dids, mask, per_token=True)
    assert len(traces) == 16
    np.testing.assert_allclose(np.asarray(per_token).sum(-1), np.asarray(ll), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ll), np.asarray(score.__wrapped__(model, ids, dids, mask)), rtol=1e-5)


def test_calls_with_tracers_run_the_traced_code(traces):
    """Inside the user's jit, grad and eval_shape (the trainer's steps and generation's loops are
    such transformations) the methods trace as they always did: once per outer trace."""
    model = tg.T5Gemma2(_config(), rngs=nnx.Rngs(0))
    ids, dids = jnp.asarray(_ids((2, 8))), jnp.asarray(_ids((2, 4), 1))
    want = np.asarray(model(ids, dids).logits)
    assert len(traces) == 4
    got = nnx.jit(lambda m, a, b: m(a, b).logits)(model, ids, dids)
    assert len(traces) == 8
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    graphdef, state = nnx.split(model)
    grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(ids, dids).logits.sum()))(state)
    assert len(traces) == 12 and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    shapes = nnx.eval_shape(lambda m: m(ids, dids), model)
    assert shapes.logits.shape == (2, 4, 512) and len(traces) == 16


@pytest.mark.slow
def test_the_dropout_key_reaches_the_compiled_program(traces):
    model = tg.apply_lora(tg.T5Gemma2(_config(), rngs=nnx.Rngs(0)), rank=4, dropout=0.5)
    _perturb(model, 2)                                        # non-zero B: the adapters change the logits
    ids, dids = _ids((1, 8)), _ids((1, 4), 1)
    plain = np.asarray(model(ids, dids).logits)
    with dropout_key(jax.random.key(0)):
        a = np.asarray(model(ids, dids).logits)
        a_traced = np.asarray(nnx.jit(lambda m: m(ids, dids).logits)(model))
    with dropout_key(jax.random.key(1)):
        b = np.asarray(model(ids, dids).logits)
    assert len(traces) == 3 * 4                                # without a key, with one (either), traced
    np.testing.assert_allclose(a, a_traced, atol=1e-5)
    assert np.abs(a - plain).max() > 1e-4 and np.abs(a - b).max() > 1e-4


def test_lora_and_quantised_models_compile_and_follow_their_adapters(traces):
    model = tg.apply_lora(tg.T5Gemma2(_config(), rngs=nnx.Rngs(0)), rank=4)
    ids, dids = _ids((2, 8)), _ids((2, 4), 1)
    base = np.asarray(model(ids, dids).logits)
    lora = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: x + 0.1, lora))
    adapted = np.asarray(model(ids, dids).logits)
    assert len(traces) == 4 and np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(adapted, np.asarray(nnx.jit(lambda m: m(ids, dids).logits)(model)), atol=1e-5)
    tg.quantize_base(model, "int8")                            # a new structure: a new program
    quantised = np.asarray(model(ids, dids).logits)
    assert len(traces) == 12
    np.testing.assert_allclose(quantised, np.asarray(nnx.jit(lambda m: m(ids, dids).logits)(model)), atol=1e-5)


@pytest.mark.slow
def test_image_inputs_are_checked_before_compiling():
    cfg = tg.preset("tiny").replace(scan_layers=False)
    t = cfg.encoder.replace(num_layers=2, layer_types=("sliding_attention", "full_attention"))
    model = tg.T5Gemma2(cfg.replace(encoder=t, decoder=t), rngs=nnx.Rngs(0))
    n = cfg.mm_tokens_per_image
    ids = _ids((2, n + 6))
    ids[:, 2:2 + n] = cfg.image_token_id
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="image placeholders do not match the images"):
        model(ids, ids[:, :4], pixel_values=pixels[:1])
    with pytest.raises(ValueError, match="image placeholders do not match"):
        model.encode(ids, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match="image placeholders do not match"):
        score(model, ids, ids[:, :4], pixel_values=pixels[:1])
    got = model(ids, ids[:, :4], pixel_values=pixels).logits
    want = nnx.jit(lambda m: m(ids, ids[:, :4], pixel_values=pixels).logits)(model)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

"""Architecture ablations: each variant builds, runs, decodes from its cache, and counts right."""

import jax
import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.config import ConfigError, FULL, SLIDING

VARIANTS = {
    "separate": dict(cross_attention="separate"),
    "global_only": dict(cross_attention="global_only"),
    "untied": dict(embeddings="untied"),
}


def _cfg(**kw):
    t = tg.preset("tiny").encoder.replace(num_layers=4, layer_types=(SLIDING, SLIDING, FULL, SLIDING))
    return tg.preset("tiny", with_vision=False).replace(encoder=t, decoder=t, **kw)


def _perturbed(cfg, seed=0):
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_full_forward(name):
    model = _perturbed(_cfg(**VARIANTS[name]))
    rng = np.random.default_rng(0)
    ids = rng.integers(7, 512, (2, 14))
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    tokens, scores = tg.generate(model, ids, mask, max_new_tokens=11, eos_id=-1, return_scores=True)
    dec_in = np.concatenate([np.full((2, 1), 2), np.asarray(tokens)[:, :-1]], axis=1)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(model(ids, dec_in, mask).logits), atol=1e-5)


def test_parameter_count_effects():
    base = tg.count_params(_cfg())
    V, D = 512, 64
    untied = tg.count_params(_cfg(embeddings="untied"))
    assert untied["text"] - base["text"] == 2 * (V * D + D)        # decoder input table + output head (+ eoi rows)
    sep = tg.count_params(_cfg(cross_attention="separate"))
    t = _cfg().decoder
    per_layer = (2 * t.hidden_size * t.num_heads * t.head_dim + 2 * t.hidden_size * t.num_kv_heads * t.head_dim
                 + 2 * t.head_dim + 2 * t.hidden_size)              # q, o, k, v, q/k norms, two sublayer norms
    assert sep["text"] - base["text"] == t.num_layers * per_layer
    assert tg.count_params(_cfg(cross_attention="global_only"))["text"] == base["text"]


@pytest.mark.slow
def test_global_only_local_layers_do_not_read_the_encoder():
    t = _cfg().decoder.replace(layer_types=(SLIDING,) * 4)
    model = _perturbed(_cfg(cross_attention="global_only").replace(decoder=t))
    dids = np.random.default_rng(1).integers(7, 512, (1, 6))
    a = np.asarray(model(np.random.default_rng(2).integers(7, 512, (1, 9)), dids).logits)
    b = np.asarray(model(np.random.default_rng(3).integers(7, 512, (1, 9)), dids).logits)
    np.testing.assert_array_equal(a, b)
    merged = _perturbed(_cfg().replace(decoder=t))
    assert np.abs(np.asarray(merged(np.random.default_rng(2).integers(7, 512, (1, 9)), dids).logits)
                  - np.asarray(merged(np.random.default_rng(3).integers(7, 512, (1, 9)), dids).logits)).max() > 1e-4


@pytest.mark.slow
def test_unequal_depth_and_width():
    enc = _cfg().encoder.replace(num_layers=6, layer_types=(SLIDING,) * 5 + (FULL,))
    dec = _cfg().decoder.replace(hidden_size=48, intermediate_size=96)
    with pytest.raises(ConfigError, match="decoder.hidden_size.*separate.*untied"):
        _cfg().replace(encoder=enc, decoder=dec)
    cfg = _cfg(cross_attention="separate", embeddings="untied").replace(encoder=enc, decoder=dec)
    model = _perturbed(cfg)
    logits = np.asarray(model(np.ones((2, 8), np.int32) * 9, np.ones((2, 5), np.int32) * 9).logits)
    assert logits.shape == (2, 5, 512) and np.isfinite(logits).all()
    assert model.decoder.stack.layers[0].cross_attn.k[...].shape[0] == 64     # reads the 64-wide encoder


def test_hf_export_refuses_variants(tmp_path):
    with pytest.raises(CheckpointError, match="cross_attention='separate'"):
        tg.save_hf(tg.T5Gemma2(_cfg(cross_attention="separate"), rngs=nnx.Rngs(0)), tmp_path)

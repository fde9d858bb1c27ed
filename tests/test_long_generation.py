"""Cached generation at long context: a 32K-token encoder input and more than 4096 new tokens.

transformers' T5Gemma 2 cannot decode past its fixed 4097-slot decoder mask; here the global
layers' caches are sized to the request and the local layers' are ring buffers of their window.
The reference is the teacher-forced forward pass over the generated sequence (another code path:
no cache, blockwise attention over [decoder keys | encoder keys]) with the same controls applied:
greedy decoding must pick its argmax at every position, before and after 4096. A repetition
penalty keeps a random model from settling on one token.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.config import FULL, SLIDING, TextConfig, preset

ENCODER_LENGTH = 32768
NEW_TOKENS = 4160        # past 4096
VOCAB = 8192             # more than NEW_TOKENS: the penalty never runs out of fresh tokens
PENALTY = 3.0


def _tower(layer_types, window):
    return TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=len(layer_types),
                      num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=window, layer_types=layer_types,
                      query_pre_attn_scalar=16.0, max_position_embeddings=65536)


@pytest.mark.slow
def test_greedy_generation_from_a_32k_encoder_past_4096_tokens(monkeypatch):
    cfg = preset("tiny", with_vision=False,
                 encoder=_tower((SLIDING, FULL), window=128),
                 decoder=_tower((SLIDING, FULL, SLIDING), window=16))   # a scanned block + a remainder
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    # Sizeable random weights so the greedy choice varies from step to step.
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and var[...].ndim >= 2:
            var.set_value(var[...] * 2)
    rng = np.random.default_rng(0)
    ids = rng.integers(7, cfg.vocab_size, (1, ENCODER_LENGTH))
    # Global layers keep a slot per new token, local layers a ring buffer of their window.
    enc = jax.ShapeDtypeStruct((1, ENCODER_LENGTH, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, ENCODER_LENGTH), jnp.int32)
    layers = jax.eval_shape(lambda e, s: model.init_cache(e, s, NEW_TOKENS), enc, seg)["layers"]
    assert [c["k"].shape[1] for c in layers] == [16, NEW_TOKENS, 16]
    assert all(c["ck"].shape[1] == ENCODER_LENGTH for c in layers)

    generate_module = importlib.import_module("t5gemma2_jax.generation.generate")
    compiled, programs = generate_module._compiled, []

    def spy(graphdef, options):
        run = compiled(graphdef, options)

        def call(*args):
            programs.append(run.lower(*args).compile())
            return programs[-1](*args)
        return call

    monkeypatch.setattr(generate_module, "_compiled", spy)
    eos = cfg.eos_token_id
    tokens, scores = tg.generate(model, ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 repetition_penalty=PENALTY, return_scores=True)
    tokens, scores = np.asarray(tokens)[0], np.asarray(scores)[0]
    assert tokens.shape == (NEW_TOKENS,) and (tokens != eos).all()
    # Nothing of size [encoder length]^2 (a dense mask or score matrix would be 4 GiB per head).
    assert programs[0].memory_analysis().temp_size_in_bytes < 2**30

    dec_in = np.concatenate([[cfg.bos_token_id], tokens[:-1]])[None]
    full = np.asarray(model(ids, dec_in).logits)[0].astype(np.float32)
    seen = np.zeros_like(full, bool)                              # decoder ids before each step
    seen[np.arange(NEW_TOKENS), dec_in[0]] = True
    seen = np.logical_or.accumulate(seen, axis=0)
    full = np.where(seen, np.where(full > 0, full / PENALTY, full * PENALTY), full)
    full[:, eos] = -np.inf                                        # min_new_tokens bans eos throughout
    assert np.isneginf(scores[:, eos]).all()
    keep = np.arange(cfg.vocab_size) != eos
    np.testing.assert_allclose(scores[:, keep], full[:, keep], atol=2e-4, rtol=1e-4)
    # Greedy consistency: each token is the teacher-forced argmax, wherever the choice is clear.
    top2 = np.sort(full, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear[:4096].mean() > 0.95 and clear[4096:].mean() > 0.95
    np.testing.assert_array_equal(tokens[clear], full.argmax(-1)[clear])
    assert len(set(tokens[4096:].tolist())) > 8                  # still choosing past 4096

"""Long inputs and long generation, and the long-input failures transformers' T5Gemma 2 users found
by running long-context evaluations:

- an encoder given no padding must stay bidirectional (transformers #42820 built a causal encoder
  mask when no attention mask or an all-ones one was passed);
- the decoder's cross part must see every encoder key, never only the last `sliding_window` of
  them in its local layers (#45540, #46111 cut the cross-attention cache to the window);
- generation from more than 4096 input tokens must work and pick the uncached forward pass's
  argmax (#45521 failed past about 4094 input tokens);
- a 32K-token encoder input with more than 4096 new tokens (slow tier): transformers cannot decode
  past its fixed 4097-slot decoder mask; here the global layers' caches are sized to the request
  and the local layers' are ring buffers of their window.

The reference for generation is the teacher-forced forward pass over the generated sequence
(another code path: no cache, blockwise attention over [decoder keys | encoder keys]) with the same
controls applied: greedy decoding must pick its argmax at every position. A repetition penalty
keeps a random model from settling on one token.
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


def _tower(layer_types, window, vocab=VOCAB):
    return TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=len(layer_types),
                      num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=window, layer_types=layer_types,
                      query_pre_attn_scalar=16.0, max_position_embeddings=65536)


def _model(encoder, decoder, seed=0):
    """Random weights drawn by NumPy into the abstract model: initialising a new shape eagerly costs
    seconds of small compiles. Sizeable values (norms off zero too) so that every input moves the
    outputs visibly."""
    model = nnx.eval_shape(lambda: tg.T5Gemma2(preset("tiny", with_vision=False, encoder=encoder, decoder=decoder),
                                               rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            v = var.get_value()
            var.set_value(rng.normal(0, 0.2 if len(v.shape) >= 2 else 0.3, v.shape).astype(v.dtype))
    return model


def _decoder_inputs(tokens, bos):
    return np.concatenate([np.full((tokens.shape[0], 1), bos), tokens[:, :-1]], axis=1)


@pytest.mark.parametrize("layer_type, later", [(SLIDING, 1), (FULL, 15)])
def test_an_unpadded_encoder_stays_bidirectional(layer_type, later):
    """A token's encoder state changes when a later token changes, with no mask and with an all-ones
    mask alike, in a local layer (the next token, inside its window) and a global one (the last)."""
    model = _model(_tower((layer_type,), window=4, vocab=64), _tower((FULL,), window=4, vocab=64))
    ids = np.random.default_rng(0).integers(7, 64, (2, 16))
    edited = ids.copy()
    edited[:, later] = np.where(ids[:, later] == 7, 8, 7)
    both = np.concatenate([ids, edited])
    unmasked = np.asarray(nnx.jit(lambda m, x: m.encode(x)[0])(model, both))
    ones = np.asarray(nnx.jit(lambda m, x, mask: m.encode(x, mask)[0])(model, both, np.ones_like(both)))
    for states in (unmasked, ones):
        assert (np.abs(states[2:, 0] - states[:2, 0]).max(-1) > 1e-3).all()   # position 0 sees the later token
    np.testing.assert_allclose(ones, unmasked, atol=1e-6)


def test_cross_attention_sees_encoder_keys_beyond_the_decoder_window():
    """Decoder layers that are all local (window 4) still attend to every one of 64 encoder keys: an
    edit to encoder token 0, which a local encoder layer keeps to the first positions, moves the
    decoder's logits at every position, in the plain call and in cached generation (whose encoder
    keys are whole in every layer's cache, and whose scores equal the plain call's after the self
    ring buffer has wrapped)."""
    S, N, W = 64, 12, 4
    model = _model(_tower((SLIDING,), window=W, vocab=64), _tower((SLIDING, SLIDING), window=W, vocab=64))
    ids = np.random.default_rng(1).integers(7, 64, (1, S))
    edited = ids.copy()
    edited[0, 0] = 7 if ids[0, 0] != 7 else 8
    layers = jax.eval_shape(lambda e, s: model.init_cache(e, s, N), jax.ShapeDtypeStruct((1, S, 32), jnp.float32),
                            jax.ShapeDtypeStruct((1, S), jnp.int32))["layers"]
    assert [c["k"].shape[1] for c in layers] == [W, W] and [c["ck"].shape[1] for c in layers] == [S, S]

    eos = model.config.eos_token_id
    keep = np.arange(64) != eos
    tokens, scores = (np.asarray(x) for x in tg.generate(model, np.concatenate([ids, edited]), max_new_tokens=N,
                                                           min_new_tokens=N, return_scores=True))
    dec_in = _decoder_inputs(tokens, model.config.bos_token_id)
    # Rows: the input with its own tokens, the edited input with the same tokens, the edited input
    # with its own tokens.
    out = nnx.jit(lambda m, x, d: m(x, d))(model, np.concatenate([ids, edited, edited]), dec_in[[0, 0, 1]])
    enc, plain = np.asarray(out.encoder_states), np.asarray(out.logits)
    assert np.abs(enc[1, :2] - enc[0, :2]).max() > 1e-3
    np.testing.assert_array_equal(enc[1, W:], enc[0, W:])          # the edit stays far from the last W keys
    assert (np.abs(plain[1] - plain[0]).max(-1) > 1e-3).all()      # every position, past the window too
    np.testing.assert_allclose(scores[0][:, keep], plain[0][:, keep], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(scores[1][:, keep], plain[2][:, keep], atol=2e-4, rtol=1e-4)
    assert np.abs(scores[1, 0, keep] - scores[0, 0, keep]).max() > 1e-3


@pytest.mark.slow
def test_generation_from_more_than_4096_input_tokens_picks_the_uncached_argmax():
    """Two rows of 4,200 and 4,150 input tokens (right-padded): greedy generation runs, its scores
    are the plain call's logits over the generated sequence, and each token is their argmax. (Slow
    tier: compiling for a 4,200-token encoder takes several seconds.)"""
    S, N = 4200, 8
    model = _model(_tower((SLIDING, FULL), window=128, vocab=256), _tower((SLIDING, FULL), window=4, vocab=256))
    ids = np.random.default_rng(2).integers(7, 256, (2, S))
    mask = np.ones_like(ids)
    mask[1, 4150:] = 0
    ids[mask == 0] = 0
    tokens, scores = (np.asarray(x) for x in tg.generate(model, ids, mask, max_new_tokens=N, min_new_tokens=N,
                                                           return_scores=True, repetition_penalty=PENALTY))
    eos = model.config.eos_token_id
    assert tokens.shape == (2, N) and (tokens != eos).all()
    dec_in = _decoder_inputs(tokens, model.config.bos_token_id)
    full = np.asarray(model(ids, dec_in, mask).logits).astype(np.float32)
    seen = np.zeros_like(full, bool)                                  # the penalty's decoder ids so far
    for b in range(2):
        seen[b, np.arange(N), dec_in[b]] = True
    seen = np.logical_or.accumulate(seen, axis=1)
    full = np.where(seen, np.where(full > 0, full / PENALTY, full * PENALTY), full)
    keep = np.arange(256) != eos
    np.testing.assert_allclose(scores[..., keep], full[..., keep], atol=2e-4, rtol=1e-4)
    full[..., eos] = -np.inf
    np.testing.assert_array_equal(tokens, full.argmax(-1))


@pytest.mark.slow
@pytest.mark.heavy
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

"""Forward-pass parity with transformers' T5Gemma2ForConditionalGeneration (fp32, eager)."""

import jax.numpy as jnp
import numpy as np
import pytest

import t5gemma2_jax as tg
from t5gemma2_jax.losses import masked_lm_loss
from hf_reference import build_hf_model, hf_forward, text_inputs

TOL = 1e-4

# Each variant exercises windows shorter than the sequences in both towers, GQA,
# query_pre_attn_scalar != head_dim and linear RoPE scaling on global layers only.
VARIANTS = {
    # pattern 3 over 8 layers: two scanned blocks + a 2-layer remainder; even window (asymmetric).
    "even_window": dict(encoder=dict(window=4, pattern=3, layers=8)),
    # odd window, unequal depths, Gemma's 6-periodic pattern, final logit soft-capping.
    "odd_window_unequal_depth": dict(encoder=dict(window=5, pattern=6, layers=7, softcap=5.0),
                                     decoder=dict(window=3, pattern=2, layers=5, softcap=5.0)),
    # multi-query attention (K=1) like the 270M/1B sizes, non-periodic layer types.
    "mqa": dict(encoder=dict(heads=4, kv_heads=1, window=6, layers=3,
                             layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = build_hf_model(seed=hash(request.param) % 1000, **VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def _ours(model, ids, mask, dids, dmask):
    out = model(jnp.asarray(ids), jnp.asarray(dids), jnp.asarray(mask), jnp.asarray(dmask))
    return np.asarray(out.logits), np.asarray(out.encoder_states)


@pytest.mark.parametrize("scan", [True, False])
def test_logits_and_encoder_output_match(pair, scan):
    hf, path = pair
    model = tg.load_hf(path, text_only=True, scan_layers=scan)
    ids, mask, dids, dmask = text_inputs(1)
    ref = hf_forward(hf, ids, mask, dids, dmask)
    logits, enc = _ours(model, ids, mask, dids, dmask)
    assert np.abs(enc - ref.encoder_last_hidden_state.numpy()).max() <= TOL
    assert np.abs(logits - ref.logits.numpy()).max() <= TOL


def test_scanned_equals_unscanned(pair):
    _, path = pair
    ids, mask, dids, dmask = text_inputs(2)
    a, _ = _ours(tg.load_hf(path, text_only=True, scan_layers=True), ids, mask, dids, dmask)
    b, _ = _ours(tg.load_hf(path, text_only=True, scan_layers=False), ids, mask, dids, dmask)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_loss_matches(pair):
    hf, path = pair
    ids, mask, dids, dmask = text_inputs(3)
    labels = np.concatenate([dids[:, 1:], np.ones((dids.shape[0], 1), dids.dtype)], axis=1)
    labels[dmask == 0] = -100
    labels[0, :2] = -100
    ref = hf_forward(hf, ids, mask, dids, dmask, labels=labels)
    model = tg.load_hf(path, text_only=True)
    logits = model(jnp.asarray(ids), jnp.asarray(dids), jnp.asarray(mask), jnp.asarray(dmask)).logits
    loss = float(masked_lm_loss(logits, jnp.asarray(labels)))
    assert abs(loss - float(ref.loss)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_gradients_match(pair, scan):
    """Training depends on the backward pass too: the loss's gradient with respect to every
    parameter equals transformers' (norms per tensor unscanned, whole-model norm scanned, and the
    tied embedding table's gradient entry by entry)."""
    _check_gradients(*pair, scan)


def test_gradients_match_mqa(tmp_path):
    """The default tier's gradient parity: the multi-query variant (the 270M/1B layout), unscanned."""
    hf = build_hf_model(seed=7, **VARIANTS["mqa"])
    hf.save_pretrained(tmp_path)
    _check_gradients(hf, tmp_path, scan=False)


def _check_gradients(hf, path, scan: bool) -> None:
    import torch
    from flax import nnx

    from t5gemma2_jax.checkpoints.export import param_name

    ids, mask, dids, dmask = text_inputs(4)
    labels = np.concatenate([dids[:, 1:], np.ones((dids.shape[0], 1), dids.dtype)], axis=1)
    labels[dmask == 0] = -100
    hf.zero_grad()
    hf_forward_with_grad = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              decoder_input_ids=torch.as_tensor(dids), decoder_attention_mask=torch.as_tensor(dmask),
                              labels=torch.as_tensor(labels))
    hf_forward_with_grad.loss.backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None and "vision" not in n
           and "multi_modal" not in n}
    model = tg.load_hf(path, text_only=True, scan_layers=scan)
    grads = nnx.jit(nnx.grad(lambda m: masked_lm_loss(m(jnp.asarray(ids), jnp.asarray(dids), jnp.asarray(mask),
                                                        jnp.asarray(dmask)).logits, jnp.asarray(labels))))(model)
    ours = {param_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    norm = lambda xs: float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in xs)))  # noqa: E731
    assert norm(ours.values()) == pytest.approx(norm(ref.values()), rel=1e-5)
    table = ref.get("model.encoder.text_model.embed_tokens.weight", ref.get("model.encoder.embed_tokens.weight"))
    np.testing.assert_allclose(ours["embedder.table"], table, atol=1e-5, rtol=1e-4)
    if not scan:    # one tensor per layer and projection on both sides: the same multiset of norms
        np.testing.assert_allclose(sorted(norm([x]) for x in ours.values()), sorted(norm([x]) for x in ref.values()),
                                   rtol=1e-4, atol=1e-6)


def test_left_padding_and_unpadded_batches(pair):
    hf, path = pair
    model = tg.load_hf(path, text_only=True)
    ids, mask, dids, dmask = text_inputs(4, pad_decoder=False)
    mask = mask[:, ::-1].copy()              # left-padded encoder (positions are not shifted, as in HF)
    ids = np.where(mask == 1, ids[:, ::-1], 0)
    ref = hf_forward(hf, ids, mask, dids, dmask)
    logits, _ = _ours(model, ids, mask, dids, dmask)
    assert np.abs(logits - ref.logits.numpy()).max() <= TOL
    ids, mask, dids, dmask = text_inputs(5, pad_encoder=False, pad_decoder=False)
    ref = hf_forward(hf, ids, mask, dids, dmask)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(dids)).logits)   # no masks at all
    assert np.abs(logits - ref.logits.numpy()).max() <= TOL


def test_discriminates_window_rule(pair):
    """A symmetric encoder window (a common bug) must break parity: the check has teeth."""
    hf, path = pair
    model = tg.load_hf(path, text_only=True, scan_layers=False)
    W = model.config.encoder.sliding_window
    model.config = model.config.replace(encoder=model.config.encoder.replace(sliding_window=W + 1))
    ids, mask, dids, dmask = text_inputs(6)
    ref = hf_forward(hf, ids, mask, dids, dmask)
    _, enc = _ours(model, ids, mask, dids, dmask)
    assert np.abs(enc - ref.encoder_last_hidden_state.numpy()).max() > 1e-3

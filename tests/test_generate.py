"""Cached generation against transformers' generate, and against our own full forward pass."""

import importlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.generation import generate_stream
from hf_reference import BOI, EOI, IMAGE, build_hf_model, text_inputs

N = 12   # more new tokens than the decoder's window (3): the local layers' ring buffer wraps


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf_model(seed=0, encoder=dict(window=4, pattern=3, layers=5),
                        decoder=dict(window=3, pattern=3, layers=4))
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    return hf, tg.load_hf(path)


def _hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=N, do_sample=False, **kw).numpy()[:, 1:]   # drop the start token
    return np.pad(out, ((0, 0), (0, N - out.shape[1])))                              # HF stops when all rows end


def test_greedy_matches_transformers_with_encoder_padding(pair):
    hf, model = pair
    ids, mask, _, _ = text_inputs(1)
    np.testing.assert_array_equal(np.asarray(tg.generate(model, ids, mask, max_new_tokens=N)),
                                  _hf_generate(hf, ids, mask))


def test_per_row_stop_at_eos_pads_the_rest(pair):
    hf, model = pair
    ids, mask, _, _ = text_inputs(1)
    greedy = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N))
    eos = int(greedy[0, 3])                       # pretend a token row 0 emits is eos
    ours = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, eos_id=eos))
    np.testing.assert_array_equal(ours, _hf_generate(hf, ids, mask, eos_token_id=eos, pad_token_id=0))
    first = int(np.argmax(greedy[0] == eos))
    assert (ours[0, first + 1:] == 0).all() and ours[0, first] == eos


def test_greedy_matches_transformers_with_images(pair):
    hf, model = pair
    rng = np.random.default_rng(3)
    image = [BOI] + [IMAGE] * 4 + [EOI]
    ids = np.zeros((2, 16), np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate([[2, 9] + image + [10, 11], [2] + image + [12] + image + [13]]):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          pixel_values=torch.as_tensor(pixels), max_new_tokens=N, do_sample=False).numpy()[:, 1:]
    np.testing.assert_array_equal(np.asarray(tg.generate(model, ids, mask, pixels, max_new_tokens=N)), ref)


def _decoder_inputs(tokens: np.ndarray) -> np.ndarray:
    """The decoder's teacher-forced inputs for generated `tokens`: the start token, then all but the last."""
    return np.concatenate([np.full((tokens.shape[0], 1), 2), tokens[:, :-1]], axis=1)


def test_cached_logits_equal_the_full_forward_at_every_step(pair):
    _, model = pair
    ids, mask, _, _ = text_inputs(2)
    tokens, scores = tg.generate(model, ids, mask, max_new_tokens=N, return_scores=True)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert scores.shape == (ids.shape[0], N, model.config.vocab_size) and scores.dtype == np.float32
    full = np.asarray(model(ids, _decoder_inputs(tokens), mask).logits)
    assert np.abs(scores - full).max() <= 1e-5


@pytest.mark.slow
def test_one_edit_to_the_layer_math_changes_training_and_decoding_alike(pair, monkeypatch):
    """Training and cached decoding run the same layer code: an ablation that shifts the attention
    sublayer's output, made once, moves both the forward logits and the generated scores, which
    still equal each other step by step."""
    import t5gemma2_jax.nn.attention as attention

    _, base = pair
    ids, mask, _, _ = text_inputs(2)
    base_tokens, base_scores = map(np.asarray, tg.generate(base, ids, mask, max_new_tokens=N, return_scores=True))
    base_full = np.asarray(base(ids, _decoder_inputs(base_tokens), mask).logits)
    call = attention.Attention.__call__

    def shifted(self, *args, **kwargs):
        y, cache = call(self, *args, **kwargs)
        return y + 0.1, cache

    monkeypatch.setattr(attention.Attention, "__call__", shifted)
    # The same weights under a structure of their own, so that its programs are compiled here, with
    # the edit (compiled programs are cached by the model's structure).
    model = tg.T5Gemma2(base.config.replace(attention_block_size=384), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(base))
    tokens, scores = map(np.asarray, tg.generate(model, ids, mask, max_new_tokens=N, return_scores=True))
    full = np.asarray(model(ids, _decoder_inputs(tokens), mask).logits)
    assert np.abs(scores - full).max() <= 1e-5
    assert np.abs(full - base_full).max() > 1e-2 and np.abs(scores - base_scores).max() > 1e-2


def _loop_bodies(hlo: str, carried: set) -> dict[str, list[str]]:
    """The while-loop bodies of an HLO module whose loop state holds an array of a shape in
    `carried`: computation name -> its instruction lines."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if m:
            cur = comps.setdefault(m.group(1), [line])
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            cur.append(line)
    bodies = {b for lines in comps.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)}
    shape_text = {f"[{','.join(map(str, s))}]" for s in carried}
    return {b: comps[b][1:] for b in bodies if any(t in comps[b][0] for t in shape_text)}


def test_decoding_loop_reads_caches_and_weights_in_place(monkeypatch):
    """Per step the compiled loop neither copies a layer's cache (it is updated in place and read
    part by part, the encoder keys never concatenated to the self keys) nor a layer's weights (on
    CPU they are sliced out of the scanned stack once, before the loop). Weights large enough for
    XLA to hand the matmuls to a library kernel, which takes no fused slice."""
    from t5gemma2_jax.config import TextConfig, default_layer_types, preset

    tower = TextConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=5, num_heads=2,
                       num_kv_heads=1, head_dim=128, sliding_window=4, layer_types=default_layer_types(5, 2))
    model = tg.T5Gemma2(preset("tiny", encoder=tower, decoder=tower, with_vision=False), rngs=nnx.Rngs(0))
    assert model.decoder.stack.blocks is not None and len(model.decoder.stack.layers) == 1
    generate_module = importlib.import_module("t5gemma2_jax.generation.generate")
    compiled, texts = generate_module._compiled, []

    def spy(graphdef, options):
        run = compiled(graphdef, options)
        def call(*args):
            program = run.lower(*args).compile()
            texts.append(program.as_text())
            return program(*args)
        return call

    monkeypatch.setattr(generate_module, "_compiled", spy)
    B, S, n = 2, 24, 10
    tg.generate(model, np.arange(B * S).reshape(B, S) % 500 + 7, max_new_tokens=n)
    K, d = tower.num_kv_heads, tower.head_dim
    caches = {(B, c, K, d) for c in (n, 4, S)} | {(B, K, d, c) for c in (n, 4, S)}
    weights = {tuple(v.shape[1:]) for v in jax.tree.leaves(nnx.state(model.decoder.stack.blocks, nnx.Param))
               if v.ndim >= 3}
    bodies = _loop_bodies(texts[0], caches)
    assert bodies
    made = []
    for lines in bodies.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\(", line)
            if m is None:
                continue
            name, dims, op = m.groups()
            shape = tuple(int(x) for x in dims.split(",") if x)
            in_place = op == "fusion" and "dynamic-update-slice" in name
            if shape in caches | weights and op not in ("parameter", "get-tuple-element", "bitcast", "tuple") \
                    and not in_place:
                made.append(f"{op} {name} {shape}")
    assert made == []


def test_greedy_choice_is_the_first_argmax():
    from t5gemma2_jax.generation.sampling import greedy

    rng = np.random.default_rng(0)
    logits = rng.integers(-2, 2, (6, 70000)).astype(np.float32)      # ties everywhere
    logits[1, rng.integers(0, 70000, 9)] = np.inf
    logits[2] = -np.inf
    logits[3, :] = 5.0
    got = np.asarray(greedy(jnp.asarray(logits)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


@pytest.mark.slow
def test_benchmark_decode_reports_the_step_against_its_read_bound(tmp_path):
    from scripts_loader import load_script

    out = tmp_path / "decode.jsonl"
    result = load_script("benchmark_decode").main(["--preset", "tiny", "--encoder-length", "24", "--batch", "2",
                                                   "--new-tokens", "3", "--reps", "1", "--bandwidth-mib", "64",
                                                   "--json", str(out)])
    cfg = tg.preset("tiny")
    assert result["step_bytes"]["head_table"] == cfg.vocab_size * cfg.decoder.hidden_size * 4
    assert result["step_bytes"]["caches"] > 0 and result["read_bandwidth_gbs"] > 0 and result["bound_s"] > 0
    assert json.loads(out.read_text())["preset"] == "tiny"


@pytest.fixture
def screened(monkeypatch):
    """Greedy decoding through the bfloat16 screen of the head (`generation.head`) at any vocabulary."""
    head = importlib.import_module("t5gemma2_jax.generation.head")
    generate_module = importlib.import_module("t5gemma2_jax.generation.generate")
    monkeypatch.setattr(head, "MIN_VOCAB", 1)
    generate_module._compiled.cache_clear()
    yield head
    generate_module._compiled.cache_clear()


def test_screened_head_chooses_the_full_heads_tokens(pair, screened, monkeypatch):
    hf, model = pair
    ids, mask, _, _ = text_inputs(1)
    np.testing.assert_array_equal(np.asarray(tg.generate(model, ids, mask, max_new_tokens=N)),
                                  _hf_generate(hf, ids, mask))
    plain = _hf_generate(hf, ids, mask)
    eos = int(plain[0, 1])
    controls = dict(suppress_tokens=sorted({int(plain[1, 0]), int(plain[2, 2])} - {eos}), min_new_tokens=5,
                    repetition_penalty=1.8)
    ours = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, eos_id=eos, **controls))
    np.testing.assert_array_equal(ours, _hf_generate(hf, ids, mask, eos_token_id=eos, pad_token_id=0, **controls))
    # An error bound too wide to certify anything: every step falls back to the full head.
    monkeypatch.setattr(screened, "_U", 1.0)
    importlib.import_module("t5gemma2_jax.generation.generate")._compiled.cache_clear()
    np.testing.assert_array_equal(np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, eos_id=eos, **controls)),
                                  ours)


def test_screen_error_bound_holds_for_this_backend():
    """The screen's bound assumes a bfloat16 dot accumulates in float32: its logits are within
    (2u + u^2 + g(1 + u)^2) |x| max|w_v| of the exact ones (u = 2^-8, g = D 2^-24 / (1 - D 2^-24))."""
    from t5gemma2_jax.generation.head import _U

    rng = np.random.default_rng(0)
    V, D = 50000, 640
    table = jnp.asarray(rng.normal(size=(V, D)).astype(np.float32) * rng.uniform(0.001, 0.1, (V, 1)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(3, D)).astype(np.float32) * 30)
    dims = (((1,), (1,)), ((), ()))
    approx = jax.lax.dot_general(x.astype(jnp.bfloat16), table.astype(jnp.bfloat16), dims,
                                 preferred_element_type=jnp.float32)
    exact = np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
    g = D * 2.0 ** -24 / (1 - D * 2.0 ** -24)
    S = np.linalg.norm(np.asarray(x), axis=1)[:, None] * np.linalg.norm(np.asarray(table), axis=1).max()
    err = np.abs(np.asarray(approx, np.float64) - exact)
    assert (err <= (2 * _U + _U ** 2 + g * (1 + _U) ** 2) * S).all()
    assert err.max() > 1e-4 * S.max()           # the bfloat16 rounding is there to bound


def test_beam_search(pair):
    hf, model = pair
    ids, mask, _, _ = text_inputs(1)
    greedy = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N))
    np.testing.assert_array_equal(np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="beam",
                                                         num_beams=1)), greedy)
    beams = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="beam", num_beams=3))
    np.testing.assert_array_equal(beams, _hf_generate(hf, ids, mask, num_beams=3, early_stopping=True))


def test_sampling_is_reproducible_and_filters(pair):
    _, model = pair
    ids, mask, _, _ = text_inputs(4)
    a = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="sample", rng=7, temperature=2.0))
    b = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="sample", rng=7, temperature=2.0))
    c = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="sample", rng=8, temperature=2.0))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N))
    top1 = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="sample", rng=1, top_k=1))
    np.testing.assert_array_equal(top1, greedy)
    tiny_p = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="sample", rng=2, top_p=1e-6))
    np.testing.assert_array_equal(tiny_p, greedy)
    _, scores = tg.generate(model, ids, mask, max_new_tokens=4, method="sample", rng=3, top_k=5, return_scores=True)
    assert (np.isfinite(np.asarray(scores)).sum(-1) == 5).all()


def test_score_is_the_log_likelihood(pair):
    _, model = pair
    ids, mask, dids, dmask = text_inputs(5)
    per_token = np.asarray(tg.score(model, ids, dids, mask, dmask, per_token=True))
    total = np.asarray(tg.score(model, ids, dids, mask, dmask))
    np.testing.assert_allclose(per_token.sum(-1), total, rtol=1e-6)
    assert (per_token <= 0).all() and (per_token[dmask == 0] == 0).all()


def test_bad_arguments(pair):
    _, model = pair
    ids, mask, _, _ = text_inputs(0)
    with pytest.raises(ValueError, match="method must be one of"):
        tg.generate(model, ids, method="nucleus")
    with pytest.raises(ValueError, match="max_new_tokens"):
        tg.generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        tg.generate(model, ids, method="sample", top_p=1.5)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tg.generate(model, ids, mask[:, :3])


def test_streaming_yields_the_greedy_tokens(pair):
    _, model = pair
    ids, mask, _, _ = text_inputs(1)
    greedy = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N))
    streamed = np.stack(list(generate_stream(model, ids, mask, max_new_tokens=N)), axis=1)
    np.testing.assert_array_equal(streamed, greedy[:, :streamed.shape[1]])


def test_repetition_penalty_equals_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    from t5gemma2_jax.generation.controls import initial_seen, make_controls, mark_seen

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    history = rng.integers(3, 50, (4, 6))
    history[:, 0] = 2                                   # the decoder start token
    for penalty in (0.7, 1.3):
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.as_tensor(history), torch.as_tensor(logits)).numpy()
        controls = make_controls(vocab_size=50, eos_id=1, repetition_penalty=penalty)
        seen = initial_seen(4, 50, 2, controls)
        for t in range(1, history.shape[1]):
            seen = mark_seen(seen, jnp.asarray(history[:, t]))
        got = np.asarray(controls.apply(jnp.asarray(logits), jnp.int32(5), seen))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert (got != logits).any()


@pytest.mark.parametrize("method,beams", [("greedy", 1), pytest.param("beam", 3, marks=pytest.mark.slow)])
def test_controls_match_transformers_generate(pair, method, beams):
    hf, model = pair
    ids, mask, _, _ = text_inputs(1)
    ours_kw = dict(max_new_tokens=N, method=method, num_beams=beams)
    plain = np.asarray(tg.generate(model, ids, mask, **ours_kw))
    eos = int(plain[0, 1])                          # row 0 would stop at its second token
    banned = sorted({int(plain[1, 0]), int(plain[2, 2])} - {eos})
    ours_kw["eos_id"] = eos
    controls = dict(suppress_tokens=banned, min_new_tokens=5, repetition_penalty=1.8)
    ours = np.asarray(tg.generate(model, ids, mask, **ours_kw, **controls))
    hf_kw = dict(num_beams=beams, early_stopping=True) if method == "beam" else {}
    ref = _hf_generate(hf, ids, mask, eos_token_id=eos, pad_token_id=0, **hf_kw, **controls)
    ref[np.cumsum(np.cumsum(ref == eos, axis=1), axis=1) > 1] = 0    # HF's beam search pads with eos
    np.testing.assert_array_equal(ours, ref)
    assert not np.isin(ours, banned).any() and (ours[:, :5] != eos).all()
    assert (ours != np.asarray(tg.generate(model, ids, mask, **ours_kw))).any()


@pytest.mark.slow
def test_controls_in_sampling_and_streaming(pair):
    _, model = pair
    ids, mask, _, _ = text_inputs(4)
    plain = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="sample", rng=5, temperature=3.0))
    banned = np.unique(plain[:, :3]).tolist()
    sampled = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, method="sample", rng=5, temperature=3.0,
                                     suppress_tokens=banned))
    assert not np.isin(sampled, banned).any()
    controls = dict(suppress_tokens=banned, min_new_tokens=3, repetition_penalty=1.5)
    greedy = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N, **controls))
    streamed = np.stack(list(generate_stream(model, ids, mask, max_new_tokens=N, **controls)), axis=1)
    np.testing.assert_array_equal(streamed, greedy[:, :streamed.shape[1]])


def test_bad_controls(pair):
    _, model = pair
    ids, _, _, _ = text_inputs(0)
    with pytest.raises(ValueError, match="suppress_tokens: ids \\[99\\]"):
        tg.generate(model, ids, suppress_tokens=[3, 99])
    with pytest.raises(ValueError, match="every token"):
        tg.generate(model, ids, suppress_tokens=range(99))
    with pytest.raises(ValueError, match="min_new_tokens"):
        tg.generate(model, ids, min_new_tokens=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        tg.generate(model, ids, method="beam", repetition_penalty=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        next(generate_stream(model, ids, repetition_penalty=-1.0))


@pytest.mark.slow
def test_generation_runs_sharded_on_a_mesh(pair):
    """Parameters sharded by the logical-axis rules over 8 devices give the same tokens."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from t5gemma2_jax.sharding import DEFAULT_RULES
    from t5gemma2_jax.sharding import spec_for

    _, model = pair
    ids, mask, _, _ = text_inputs(6, batch=4)
    ref = np.asarray(tg.generate(model, ids, mask, max_new_tokens=N))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = nnx.clone(model)
    placed = 0
    for _, var in nnx.iter_graph(sharded):
        if isinstance(var, nnx.Param):
            spec, _ = spec_for(var.get_metadata()["logical_axes"], var[...].shape, mesh, DEFAULT_RULES)
            var.set_value(jax.device_put(var[...], NamedSharding(mesh, spec)))
            placed += any(a is not None for a in spec)
    assert placed > 0
    with jax.set_mesh(mesh):
        out = np.asarray(tg.generate(sharded, ids, mask, max_new_tokens=N))
    np.testing.assert_array_equal(out, ref)

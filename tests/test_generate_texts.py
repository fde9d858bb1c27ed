"""generate_texts: prompts in, texts out — suppression, min_new_tokens, stop strings, batching."""

import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.data.prompts import default_suppress_tokens, encode_prompt, pad_prompts
from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.generation import generate_texts, texts as texts_module
from t5gemma2_jax.generation.texts import cut_at_stop

# One length of output throughout (max_new_tokens=8): each length is a decoding program of its own.
TEXTS = ["a red circle", "the blue square is above", "there are two shapes. the", "a green", "what color is it?"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tiny_tokenizer_path())


@pytest.fixture(scope="module")
def model():
    return tg.T5Gemma2(tg.preset("tiny"), rngs=nnx.Rngs(0))


def _prompts(tok, images: int = 0, cfg=None):
    mm = cfg.mm_tokens_per_image if cfg is not None else 0
    return [encode_prompt(tok, t, mode="[S2S]", images=images, mm_tokens_per_image=mm) for t in TEXTS]


def _make_argmax(model, prompts, token: int):
    """A copy of `model` whose first greedy token is `token` for every prompt: its (tied) embedding
    row becomes a large multiple of the rows greedy picked first."""
    biased = nnx.clone(model)
    ids, mask = pad_prompts(prompts)
    first = np.asarray(tg.generate(model, ids, mask, max_new_tokens=1))[:, 0]
    table = biased.embedder.table
    table.set_value(table[...].at[token].set(20.0 * table[...][np.unique(first)].sum(0)))
    return biased


@pytest.mark.slow
def test_default_suppression_keeps_sentinels_out(tok, model):
    prompts = _prompts(tok)
    sentinel = tok.special.sentinels[0]
    biased = _make_argmax(model, prompts, sentinel)
    piece = tok.id_to_piece(sentinel)
    raw = generate_texts(biased, tok, prompts, max_new_tokens=8, suppress_tokens=None)
    assert any(piece in t for t in raw), raw
    clean = generate_texts(biased, tok, prompts, max_new_tokens=8)
    assert not any(piece in t for t in clean), clean
    banned = default_suppress_tokens(tok)
    s = tok.special
    assert set(banned) >= {*s.sentinels, *s.modes.values(), s.boi, s.eoi, s.image, s.pad, s.bos}
    assert s.eos not in banned and s.end_of_turn not in banned


def test_min_new_tokens_holds_off_eos(tok, model):
    prompts = _prompts(tok)
    biased = _make_argmax(model, prompts, tok.special.eos)
    assert generate_texts(biased, tok, prompts, max_new_tokens=8) == [""] * len(prompts)
    ids, mask = pad_prompts(prompts)
    tokens = np.asarray(tg.generate(biased, ids, mask, max_new_tokens=8, min_new_tokens=3,
                                    suppress_tokens=default_suppress_tokens(tok)))
    assert (tokens[:, :3] != tok.special.eos).all()
    texts = generate_texts(biased, tok, prompts, max_new_tokens=8, min_new_tokens=3)
    assert all(texts), texts


def test_stop_strings_cut_the_text(tok, model):
    prompts = _prompts(tok)
    full = generate_texts(model, tok, prompts, max_new_tokens=8)
    longest = max(full, key=len)
    stop = longest[len(longest) // 2:len(longest) // 2 + 2]
    cut = generate_texts(model, tok, prompts, max_new_tokens=8, stop=[stop, "\x00never"])
    assert cut == [cut_at_stop(t, [stop]) for t in full]
    assert cut[full.index(longest)] == longest[:longest.index(stop)]
    assert cut_at_stop("a. b? c", ["?", "."]) == "a" and cut_at_stop("abc", ["", "x"]) == "abc"


@pytest.mark.slow
def test_batches_equal_one_by_one_with_one_program(tok, model, monkeypatch):
    cfg = model.config
    prompts = _prompts(tok, images=1, cfg=cfg)
    rng = np.random.default_rng(0)
    size = cfg.vision.image_size
    pixels = rng.normal(size=(len(prompts), 1, 3, size, size)).astype(np.float32)
    shapes = []
    inner = texts_module.generate

    def recording(model, ids, mask, pixel_values, **kw):
        shapes.append((ids.shape, pixel_values.shape))
        return inner(model, ids, mask, pixel_values, **kw)

    monkeypatch.setattr(texts_module, "generate", recording)
    batched = generate_texts(model, tok, prompts, pixel_values=pixels, max_new_tokens=8, batch_size=2)
    assert len(shapes) == 3 and len(set(shapes)) == 1      # the last batch is padded to the same shape
    single = [generate_texts(model, tok, [p], pixel_values=pixels[i:i + 1], max_new_tokens=8)[0]
              for i, p in enumerate(prompts)]
    assert batched == single and len(set(batched)) > 1


def test_bad_arguments(tok, model):
    prompts = _prompts(tok)
    with pytest.raises(ValueError, match="no prompts"):
        generate_texts(model, tok, [])
    with pytest.raises(ValueError, match="suppress_tokens must be"):
        generate_texts(model, tok, prompts, suppress_tokens="all")
    with pytest.raises(ValueError, match="pixel_values must be"):
        generate_texts(model, tok, prompts, pixel_values=np.zeros((2, 1, 3, 32, 32)))
    with pytest.raises(ValueError, match="batch_size"):
        generate_texts(model, tok, prompts, batch_size=0)


@pytest.mark.slow
def test_score_candidates_equals_scoring_each_pair(tok, model):
    from t5gemma2_jax.generation import score_candidates

    prompts = _prompts(tok)[:3]
    cands = [[tok.encode("red."), tok.encode("the square.")], [tok.encode("blue.")],
             [tok.encode("above the blue circle."), tok.encode("a"), tok.encode("green.")]]
    got = score_candidates(model, prompts, cands, batch_size=4)
    assert [len(g) for g in got] == [2, 1, 3]
    for p, cs, g in zip(prompts, cands, got):
        for c, value in zip(cs, g):
            want = float(tg.score(model, p[None], c[None])[0])
            assert abs(value - want) < 1e-4 * max(1.0, abs(want))
    with pytest.raises(ValueError, match="2 candidate lists"):
        score_candidates(model, prompts, cands[:2])

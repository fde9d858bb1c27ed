"""Tokenizer wrapper: special ids read by piece name, Gemma 3 fallbacks, overrides, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from data_test_helpers import tok  # noqa: F401  (fixture)
from t5gemma2_jax.data import tokenizer as tokenizer_mod
from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path
from t5gemma2_jax.data.tokenizer import Tokenizer


def test_tiny_layout_matches_the_tiny_model_preset(tok):
    s = tok.special
    assert tok.vocab_size == 512
    assert (s.pad, s.eos, s.bos, s.unk) == (0, 1, 2, 3)
    assert (s.boi, s.eoi, s.image) == (4, 5, 6)  # preset('tiny'): boi 4, eoi 5, image 6
    assert (s.start_of_turn, s.end_of_turn) == (7, 8)
    assert dict(s.modes) == {"[NLU]": 9, "[NLG]": 10, "[S2S]": 11}
    assert s.sentinels == tuple(range(12, 12 + 64))
    assert [tok.id_to_piece(i) for i in (12, 75)] == ["<unused0>", "<unused63>"]


def test_roundtrip_and_no_special_ids_from_text(tok):
    for text in ["a red circle above a blue square.", "Hello, 世界! 42 ümlaut\n\ttabs  spaces"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not tok.has_reserved(ids)
    assert tok.has_reserved(tok.encode("text <unused3> more"))  # a sentinel written in the text


def test_image_block_is_the_gemma3_expansion(tok):
    block = tok.image_block(4)
    nl = list(tok.encode("\n\n"))
    assert list(block) == nl + [4, 6, 6, 6, 6, 5] + nl
    try:
        from t5gemma2_jax.data.tokenizer import expand_image_tokens
    except ImportError:
        return
    assert expand_image_tokens([4], 4, boi_id=4, eoi_id=5, image_token_id=6,
                               newline_ids=nl) == list(block)


def test_pickle_reloads(tok):
    t2 = pickle.loads(pickle.dumps(tok))
    assert t2.special == tok.special
    np.testing.assert_array_equal(t2.encode("a blue square"), tok.encode("a blue square"))


def _renamed_model(tmp_path, renames: dict[str, str]) -> str:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(tiny_tokenizer_path(), "rb").read())
    for p in proto.pieces:
        if p.piece in renames:
            p.piece = renames[p.piece]
    path = tmp_path / "renamed.model"
    path.write_bytes(proto.SerializeToString())
    return str(path)


def test_gemma3_like_vocabulary_modes_from_unused_and_image_fallback(tmp_path, monkeypatch):
    # Like Gemma 3: no [NLU]/[NLG]/[S2S] pieces and no <image_soft_token> piece.
    path = _renamed_model(tmp_path, {"[NLU]": "<nlu>", "[NLG]": "<nlg>", "[S2S]": "<s2s>",
                                     "<image_soft_token>": "<unused999>"})
    with pytest.raises(ValueError, match=r"<image_soft_token>.*tokenizer_overrides"):
        Tokenizer(path)
    t = Tokenizer(path, overrides={"image": 6})
    assert t.special.image == 6
    # Modes take the first free <unusedN> pieces; sentinels follow and exclude every taken id.
    assert dict(t.special.modes) == {"[NLU]": 12, "[NLG]": 13, "[S2S]": 14}
    assert t.special.sentinels[:2] == (15, 16) and 6 not in t.special.sentinels
    # A full-size Gemma 3 vocabulary uses the T5Gemma 2 ids for missing pieces (256001 there).
    monkeypatch.setattr(tokenizer_mod, "GEMMA3_VOCAB_SIZE", 512)
    monkeypatch.setitem(tokenizer_mod.GEMMA3_DEFAULT_IDS, "image", 6)
    assert Tokenizer(path).special.image == 6


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError, match="tokenizer_overrides"):
        Tokenizer(tiny_tokenizer_path(), overrides={"imgae": 6})

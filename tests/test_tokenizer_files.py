"""A SentencePiece file is validated when it is loaded: a model without an UNKNOWN piece, a missing
required piece, a special id outside the vocabulary or an unreadable file is one ConfigError naming
the file and the problem (and one `error:` line from scripts/train.py --check), never a raw
sentencepiece IndexError."""

from __future__ import annotations

from pathlib import Path

import pytest
from sentencepiece import sentencepiece_model_pb2

from t5gemma2_jax.config import ConfigError
from t5gemma2_jax.data import Tokenizer, tiny_tokenizer_path
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN = sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN
NORMAL = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL


def _edited(tmp_path: Path, *, drop_unknown: bool = False, renames: dict[str, str] | None = None) -> str:
    """The tiny model with its UNKNOWN piece made an ordinary one and/or pieces renamed."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tiny_tokenizer_path()).read_bytes())
    for p in proto.pieces:
        if drop_unknown and p.type == UNKNOWN:
            p.type = NORMAL
        p.piece = (renames or {}).get(p.piece, p.piece)
    path = tmp_path / "edited.model"
    path.write_bytes(proto.SerializeToString())
    return str(path)


@pytest.mark.parametrize("renames", [None, {"[NLU]": "<nlu>"}], ids=["all pieces", "a piece missing"])
def test_a_model_without_an_unknown_piece_is_refused(tmp_path, renames):
    # Without an UNKNOWN piece sentencepiece maps a missing piece to -1 and id_to_piece(-1) raises
    # IndexError("piece id is out of range"): the lookup of [NLU] would crash.
    path = _edited(tmp_path, drop_unknown=True, renames=renames)
    with pytest.raises(ConfigError, match=rf"^data.tokenizer: '{path}' has no UNKNOWN piece"):
        Tokenizer(path)


def test_missing_pieces_and_ids_outside_the_vocabulary_are_named(tmp_path):
    path = _edited(tmp_path, renames={"<bos>": "<b>"})
    with pytest.raises(ConfigError, match=rf"^data.tokenizer: '{path}' has no piece '<bos>' \(role 'bos'\); "
                                          r"pass data.tokenizer_overrides='bos=<id>'$"):
        Tokenizer(path)
    with pytest.raises(ConfigError, match=r"has no id 600 for 'image' \(data.tokenizer_overrides\): the vocabulary "
                                          r"has 512 pieces"):
        Tokenizer(tiny_tokenizer_path(), overrides={"image": 600})
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=rf"^data.tokenizer: '{garbage}' is not a usable SentencePiece model"):
        Tokenizer(garbage)


def test_check_reports_a_bad_tokenizer_in_one_line(tmp_path, capsys):
    script = load_script("train")
    path = _edited(tmp_path, drop_unknown=True, renames={"[NLU]": "<nlu>"})
    rc = script.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir", str(tmp_path / "w"), "--check",
                      f"data.tokenizer={path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: data.tokenizer: '{path}' has no UNKNOWN piece") and err.count("\n") == 1, err

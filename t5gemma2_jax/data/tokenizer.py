"""SentencePiece tokenizer with Gemma 3 / T5Gemma 2 special ids.

Special ids are read from the `.model` file *by piece name*, so the same code serves a real
Gemma 3 `tokenizer.model` (262144 pieces) and our tiny 512-piece model. Names looked up:

| role | piece name | Gemma 3 id | tiny id |
|---|---|---|---|
| pad, eos, bos, unk | `<pad>`, `<eos>`, `<bos>`, `<unk>` | 0, 1, 2, 3 | 0, 1, 2, 3 |
| boi | `<start_of_image>` | 255999 | 4 |
| eoi | `<end_of_image>` | 256000 | 5 |
| image | `<image_soft_token>` | 256001 (T5Gemma 2; not a Gemma 3 piece, see below) | 6 |
| start/end of turn | `<start_of_turn>`, `<end_of_turn>` | 105, 106 | 7, 8 |
| UL2 modes | `[NLU]`, `[NLG]`, `[S2S]`, else `<unused0..2>` | 6, 7, 8 | 9, 10, 11 |
| sentinels | `<unusedN>` not used above, ascending N | `<unused3>`.. = 9, 10, ... | 12, 13, ... |

Gemma 3's file has no `<image_soft_token>` piece (HF Gemma 3 appends it as id 262144; T5Gemma 2
uses 256001 instead), so when a name is missing from a 262144-piece vocabulary the Gemma 3 /
T5Gemma 2 default id from `GEMMA3_DEFAULT_IDS` is used. Any id can be forced with `overrides`
(keys: the role names of `SpecialIds`, e.g. `{"image": 256001}`).

Sentinels are the UL2/T5 span markers: the `<unusedN>` pieces in ascending N that no other role
took, the first `num_sentinels` of them. With a real Gemma 3 vocabulary and the default 96 they
are `<unused3>`..`<unused98>` = ids 9..104 (modes take `<unused0..2>` = 6, 7, 8); asking for more
continues into Gemma 3's high `<unused99>`.. range, always excluding ids used by another role.

`expand_image_tokens` is the same image expansion for inference prompts, on text (the string
`Gemma3Processor.full_image_sequence` builds, which is what matches HF exactly) or on ids.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from t5gemma2_jax import storage
from t5gemma2_jax.configlib import ConfigError

GEMMA3_VOCAB_SIZE = 262_144
# Ids of the T5Gemma 2 (Gemma 3) vocabulary for pieces a Gemma 3 file may lack.
GEMMA3_DEFAULT_IDS = {"boi": 255_999, "eoi": 256_000, "image": 256_001,
                      "start_of_turn": 105, "end_of_turn": 106}

PIECE_NAMES = {
    "pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>",
    "boi": "<start_of_image>", "eoi": "<end_of_image>", "image": "<image_soft_token>",
    "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>",
}
MODE_NAMES = ("[NLU]", "[NLG]", "[S2S]")
IMAGE_MARKER = "<start_of_image>"  # in text: where an image goes
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
_UNUSED = re.compile(r"^<unused(\d+)>$")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    bos: int
    unk: int
    boi: int
    eoi: int
    image: int
    start_of_turn: int
    end_of_turn: int
    modes: Mapping[str, int]  # "[NLU]" / "[NLG]" / "[S2S]" -> id
    sentinels: tuple[int, ...]

    def reserved(self) -> np.ndarray:
        """Ids that must never come out of encoding user text (they would make a target or a
        template ambiguous)."""
        ids = {self.pad, self.eos, self.bos, self.boi, self.eoi, self.image,
               self.start_of_turn, self.end_of_turn, *self.modes.values(), *self.sentinels}
        return np.array(sorted(ids), np.int32)


class Tokenizer:
    """A picklable SentencePiece wrapper (Grain workers receive a copy and reload the file)."""

    def __init__(self, path: str | os.PathLike, *, overrides: Mapping[str, int] | None = None,
                 num_sentinels: int = 96):
        self.path = os.fspath(path)
        self.overrides = dict(overrides or {})
        self.num_sentinels = num_sentinels
        self._load()

    def _load(self) -> None:
        """Reads and validates the file: ConfigError naming it and the problem, never a raw
        sentencepiece error."""
        import sentencepiece as spm

        if not storage.as_path(self.path).exists():
            raise FileNotFoundError(f"data.tokenizer: no SentencePiece model at {self.path!r}")
        try:
            if storage.is_url(self.path):   # sentencepiece opens local files only: hand it the bytes
                self._sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(self.path))
            else:
                self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except storage.StorageError:
            raise
        except (OSError, RuntimeError) as e:
            raise self._error(f"is not a usable SentencePiece model ({type(e).__name__}: {e})") from None
        self.vocab_size: int = self._sp.get_piece_size()
        if self._sp.unk_id() < 0:
            # Every lookup of a piece the model lacks then fails (sentencepiece: "piece id is out of range").
            raise self._error("has no UNKNOWN piece (type UNKNOWN, usually <unk>); SentencePiece cannot "
                              "look up missing pieces without one: retrain it with unk_id set")
        try:
            self.special = self._find_special_ids()
            self._double_newline = self.encode("\n\n")
        except (IndexError, RuntimeError) as e:
            raise self._error(f"is not a usable SentencePiece model ({type(e).__name__}: {e})") from None
        self._reserved = self.special.reserved()

    def _error(self, problem: str) -> ConfigError:
        return ConfigError(f"data.tokenizer: {self.path!r} {problem}")

    def __getstate__(self):
        return {"path": self.path, "overrides": self.overrides, "num_sentinels": self.num_sentinels}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    # ---- special ids ----------------------------------------------------------------------
    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id returns unk for unknown pieces; check the round trip.
        return i if self._sp.id_to_piece(i) == piece else None

    def _find_special_ids(self) -> SpecialIds:
        unknown = set(self.overrides) - set(PIECE_NAMES) - {"modes", "sentinels"}
        if unknown:
            raise ConfigError(f"data.tokenizer_overrides: unknown names {sorted(unknown)}; "
                              f"known: {sorted(PIECE_NAMES)}")
        ids: dict[str, int] = {}
        for role, piece in PIECE_NAMES.items():
            if role in self.overrides:
                ids[role] = int(self.overrides[role])
                continue
            found = self._piece_id(piece)
            if found is None and role in GEMMA3_DEFAULT_IDS and self.vocab_size >= GEMMA3_VOCAB_SIZE:
                found = GEMMA3_DEFAULT_IDS[role]
            if found is None:
                raise self._error(f"has no piece {piece!r} (role {role!r}); "
                                  f"pass data.tokenizer_overrides='{role}=<id>'")
            ids[role] = found
        for role, i in ids.items():
            if not 0 <= i < self.vocab_size:
                raise self._error(f"has no id {i} for {role!r} (data.tokenizer_overrides): the vocabulary "
                                  f"has {self.vocab_size} pieces")

        unused = sorted(
            (int(m.group(1)), i) for i in range(self.vocab_size)
            if (m := _UNUSED.match(self._sp.id_to_piece(i))))
        taken = set(ids.values())
        pool = [i for _, i in unused if i not in taken]

        modes: dict[str, int] = {}
        for name in MODE_NAMES:
            found = self._piece_id(name)
            if found is None:  # Gemma 3 has no [NLU] pieces: use the first free <unusedN>.
                if not pool:
                    raise self._error(f"has no piece {name!r} and no <unusedN> piece left for it")
                found = pool.pop(0)
            modes[name] = found
        sentinels = tuple(pool[: self.num_sentinels])
        if not sentinels:
            raise self._error("has no <unusedN> pieces left for the UL2 sentinels")
        return SpecialIds(modes=modes, sentinels=sentinels, **ids)

    # ---- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, without bos/eos."""
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def has_reserved(self, ids: np.ndarray) -> bool:
        """Whether encoded user text contains a reserved id (see `SpecialIds.reserved`)."""
        return bool(np.isin(ids, self._reserved).any())

    def image_block(self, mm_tokens_per_image: int) -> np.ndarray:
        """The Gemma 3 expansion of one image: "\\n\\n" boi image*mm eoi "\\n\\n"."""
        s = self.special
        return np.concatenate([
            self._double_newline, [s.boi], np.full(mm_tokens_per_image, s.image, np.int32),
            [s.eoi], self._double_newline]).astype(np.int32)


def image_token_sequence(mm_tokens_per_image: int = 256) -> str:
    """The text that replaces one `<start_of_image>` (Gemma3Processor.full_image_sequence)."""
    return f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * mm_tokens_per_image}{EOI_TOKEN}\n\n"


def expand_image_tokens(
    prompt: str | Sequence[int],
    mm_tokens_per_image: int = 256,
    *,
    boi_id: int | None = None,
    eoi_id: int | None = None,
    image_token_id: int | None = None,
    newline_ids: Sequence[int] = (),
) -> str | list[int]:
    """Expand every `<start_of_image>` of a prompt into the full image placeholder sequence.

    - `prompt: str` (the exact Hugging Face behaviour): each `<start_of_image>` becomes
      `image_token_sequence(mm_tokens_per_image)`; tokenise the result afterwards.
    - `prompt: Sequence[int]` (already tokenised): each `boi_id` becomes
      `[*newline_ids, boi_id, image_token_id * n, eoi_id, *newline_ids]`. Pass the ids your
      tokenizer gives for "\\n\\n" as `newline_ids`; tokenising the expanded text can merge those
      newlines with neighbouring whitespace, so the text path is the one that matches HF exactly.
    """
    if isinstance(prompt, str):
        return prompt.replace(BOI_TOKEN, image_token_sequence(mm_tokens_per_image))
    if boi_id is None or eoi_id is None or image_token_id is None:
        raise ValueError("expand_image_tokens on token ids needs boi_id, eoi_id and image_token_id")
    out: list[int] = []
    block = [*newline_ids, boi_id, *([image_token_id] * mm_tokens_per_image), eoi_id, *newline_ids]
    for t in prompt:
        if int(t) == boi_id:
            out.extend(block)
        else:
            out.append(int(t))
    return out

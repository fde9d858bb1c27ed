"""RULER-style synthetic long-context tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?"), at any length in any tokenizer's tokens.

    tok = Tokenizer("tokenizer.model")
    records = make_records("niah_single", tok, length=32768, num_samples=50, seed=0)
    paths = write_tasks("ruler/", tok, tasks=TASK_NAMES, lengths=[4096, 8192], num_samples=50)

Tasks (RULER's names where RULER has the task; answers scored by `score`):

| task | the input | the answers | metric |
|---|---|---|---|
| `niah_single` | one needle "One of the special magic numbers for KEY is: VALUE." in a haystack | its value | all |
| `niah_multikey` | the queried needle among needles with other keys | the queried key's value | all |
| `niah_multivalue` | several needles with the same key | every value | all |
| `niah_multiquery` | several needles, all queried | every value | all |
| `vt` | chains "VAR A = 12345." "VAR B = VAR A." ... in the haystack, one queried | its variables | all |
| `cwe` | a numbered word list, ten words frequent, the rest rare | the ten frequent words | all |
| `qa` | short documents about people, each in its own town | the queried person's town | part |

The string-match metrics are RULER's: per record, `all` is the fraction of the answers that appear in
the prediction, `part` is 1 when any does (case-insensitive substring match); tables report the mean
in percent, as RULER does.

A record's `length` is the requested size of the encoder input in tokens of the given tokenizer, as
the model receives it (`data.prompts.encode_prompt`: bos, the optional UL2 mode token or chat turn,
the text); its `tokens` is the real size, at most `length` and short of it by less than one filler
word (the haystack grows word by word). Each answer appears in `input` exactly at its `positions`
(case-insensitive, so a substring match can only find it there) and nowhere else; `needles` gives
every inserted needle's character offset, token offset (in the tokens of `input` alone) and depth
(the share of the filler's tokens before it), and `depth` the depth asked for. A record is
deterministic in (seed, task, length, index, number of samples: it spreads single needles from the
start to the end): other tasks and lengths in the same run leave a file unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from t5gemma2_jax import storage
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data.prompts import encode_prompt
from t5gemma2_jax.data.tokenizer import Tokenizer

HAYSTACKS = ("noise", "words")
METRICS = ("string_match_all", "string_match_part")
RECORD_FIELDS = ("input", "answers", "task", "length", "tokens", "index", "seed", "depth", "needles", "positions",
                 "metric", "max_new_tokens", "chat", "mode", "haystack")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    metric: str
    max_new_tokens: int     # generation budget: the longest answer in the tokens of any tokenizer here, with room


TASKS = {
    "niah_single": TaskSpec("string_match_all", 32),
    "niah_multikey": TaskSpec("string_match_all", 32),
    "niah_multivalue": TaskSpec("string_match_all", 96),
    "niah_multiquery": TaskSpec("string_match_all", 96),
    "vt": TaskSpec("string_match_all", 64),
    "cwe": TaskSpec("string_match_all", 128),
    "qa": TaskSpec("string_match_part", 32),
}
TASK_NAMES = tuple(TASKS)

NEEDLES = 4            # needles of the multi-key, multi-value and multi-query tasks
VT_HOPS, VT_CHAINS = 4, 2
CWE_WORDS = 10
ATTEMPTS = 50          # fresh draws before giving up on a record whose answers collide with its text

# The "noise" haystack: a few plain sentences repeated, so that only the needles carry information.
NOISE = ("The hills are quiet tonight. The river keeps on flowing. The wind moves through the old trees. "
         "Time passes slowly in the valley. And then the day goes on.")
_FRAMES = ("The {a} {n} sat beside the {m}.", "Nobody expected the {n} to be so {a}.",
           "Every {n} remembers a {a} {m}.", "A {a} {n} waited near the {m} all day.",
           "Somewhere a {n} and a {m} argued about something {a}.")
_TOWN_SUFFIXES = ("ford", "ton", "bury", "field", "wick", "haven", "port", "stead", "dale", "mere")

_INTRO = {
    "niah": "The text below hides some special magic numbers. Remember them: a question about them follows the text.",
    "vt": "The text below hides chains of variable assignments. Track them: a question about them follows the text.",
    "cwe": "Below is a numbered list of words. Some words appear many times, most only a few times.",
    "qa": "Answer the question using the documents below.",
}


class TooShort(ConfigError):
    """The requested length cannot hold the task's fixed text."""


# -- word lists --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    """Plain lowercase English nouns, adjectives and verbs (wonderwords' lists, the ones RULER draws
    its words from) without the words its profanity list flags, sorted, so a seed picks the same
    words on every machine."""
    from wonderwords import RandomWord, filter_profanity

    rw = RandomWord()
    return {cat: tuple(filter_profanity(rw.filter(include_categories=[cat], regex=r"[a-z]{3,10}")))
            for cat in ("noun", "adjective", "verb")}


def occurrences(text: str, s: str) -> list[int]:
    """Character offsets of every case-insensitive occurrence of `s` in `text` (overlapping ones too):
    where a substring-matching metric could find it."""
    text, s = text.lower(), s.lower()
    out, i = [], text.find(s)
    while i >= 0:
        out.append(i)
        i = text.find(s, i + 1)
    return out


# -- metrics -----------------------------------------------------------------------------------------

def clean_prediction(text: str) -> str:
    """RULER's clean-up of a completion: control characters become newlines, ends are stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """The fraction of `answers` contained in `prediction` (case-insensitive)."""
    p = clean_prediction(prediction).lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any of `answers` is contained in `prediction` (case-insensitive), else 0.0."""
    p = clean_prediction(prediction).lower()
    return float(any(a.lower() in p for a in answers))


def score(prediction: str, record: dict) -> float:
    """The record's own metric of one prediction, in [0, 1]."""
    fn = string_match_part if record["metric"] == "string_match_part" else string_match_all
    return fn(prediction, record["answers"])


# -- filler text -------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Stream:
    """Filler text word by word: `text` holds every word with the separator before it, word i spans
    `text[start[i]:end[i]]`, and `units` are the word indices where a sentence or document begins
    (where a needle may go)."""

    text: str
    start: np.ndarray
    end: np.ndarray
    units: np.ndarray
    sep: str            # the separator put around an inserted needle

    @classmethod
    def build(cls, units: Iterable[str], unit_sep: str, sep: str) -> "_Stream":
        parts, start, end, first, pos = [], [], [], [], 0
        for u, unit in enumerate(units):
            for w, word in enumerate(unit.split(" ")):
                gap = "" if pos == 0 else (unit_sep if w == 0 else " ")
                if w == 0:
                    first.append(len(start))
                parts.append(gap + word)
                start.append(pos + len(gap))
                pos += len(gap) + len(word)
                end.append(pos)
        return cls("".join(parts), np.array(start), np.array(end), np.array(first), sep)

    @property
    def words(self) -> int:
        return len(self.start)

    def render(self, m: int, inserts: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
        """The first `m` words with each (depth, text) insert at the unit boundary nearest its depth
        (inserts at one boundary keep their order), and the character offset of each insert."""
        body = self.text[:self.end[m - 1]] if m else ""
        bounds = np.append(self.units[self.units < m], m)
        where = [int(bounds[np.argmin(np.abs(bounds - d * m))]) for d, _ in inserts]
        pieces, offsets, cut, written = [], [0] * len(inserts), 0, 0
        for j in sorted(range(len(inserts)), key=lambda j: where[j]):
            b, text = where[j], inserts[j][1]
            at = len(body) if b == m else int(self.start[b])
            pieces.append(body[cut:at])
            written += at - cut
            cut = at
            # Before a word the needle is followed by a separator; at the end it follows one.
            before = self.sep if b == m and written else ""
            after = "" if b == m else self.sep
            offsets[j] = written + len(before)
            pieces.append(before + text + after)
            written += len(before) + len(text) + len(after)
        pieces.append(body[cut:])
        return "".join(pieces), offsets


def _noise_stream(n_chars: int) -> _Stream:
    sentences = re.findall(r"[^.]+\.", NOISE)
    return _Stream.build((s.strip() for _ in range(n_chars // len(NOISE) + 1) for s in sentences), " ", " ")


def _word_sentences(rng, n_chars: int, words) -> Iterable[str]:
    total = 0
    while total < n_chars:
        frame = _FRAMES[rng.integers(len(_FRAMES))]
        s = frame.format(a=_pick(rng, words["adjective"]), n=_pick(rng, words["noun"]), m=_pick(rng, words["noun"]))
        total += len(s) + 1
        yield s[0].upper() + s[1:]


def _words_stream(rng, n_chars: int) -> _Stream:
    return _Stream.build(_word_sentences(rng, n_chars, word_lists()), " ", " ")


def _pick(rng, pool):
    return pool[rng.integers(len(pool))]


def _distinct(rng, pool, n: int, exclude: Iterable[str] = ()) -> list[str]:
    """`n` different entries of `pool`, none in `exclude`."""
    exclude = set(exclude)
    out: list[str] = []
    while len(out) < n:
        w = _pick(rng, pool)
        if w not in exclude and w not in out:
            out.append(w)
    return out


# -- length fitting ----------------------------------------------------------------------------------

def _fit(measure: Callable[[int], int], target: int, upper: int) -> tuple[int, int] | None:
    """The largest m in [0, upper] with measure(m) <= target, for a measure that grows with m about
    linearly, with few measurements (each is a full encode); None when even `upper` fits (the
    filler has to grow)."""
    lo, n_lo = 0, measure(0)
    hi, n_hi = upper, measure(upper)
    if n_hi <= target:
        return None
    step = 0
    while hi - lo > 1:
        step += 1
        if step % 3 == 0:                   # bisection now and then bounds the worst case
            g = (lo + hi) // 2
        else:                               # interpolation lands within a few words of the answer
            g = lo + int((target - n_lo) * (hi - lo) / max(1, n_hi - n_lo))
            g = min(max(g, lo + 1), hi - 1)
        n = measure(g)
        if n <= target:
            lo, n_lo = g, n
        else:
            hi, n_hi = g, n
    return lo, n_lo


@dataclasses.dataclass
class _Draft:
    """One record before its length is fitted: fixed text around a filler with inserted needles."""

    head: str
    tail: str
    answers: list[str]
    needles: list[tuple[float, str, list[tuple[int, int]]]]   # depth, text, (answer index, offset in text)
    depth: float | None


def _fill_stream(tok, draft: _Draft, make_stream: Callable[[int], _Stream], length: int, layout: dict,
                 name: str) -> tuple[str, int, list[int]]:
    """(input, its tokens, needle offsets) with the most filler words that keep it within `length`."""
    inserts = [(d, text) for d, text, _ in draft.needles]

    def build(stream, m):
        body, offsets = stream.render(m, inserts)
        return draft.head + body + draft.tail, [len(draft.head) + o for o in offsets]

    def measure(stream, m):
        return len(encode_prompt(tok, build(stream, m)[0], **layout))

    fixed = measure(_Stream.build([], " ", " "), 0)
    if fixed > length:
        raise TooShort(f"--lengths: {length} tokens cannot hold {name}: its question and needles alone take "
                       f"{fixed} tokens of this tokenizer")
    chars = 4 * length + 1000
    while True:
        stream = make_stream(chars)
        fitted = _fit(lambda m: measure(stream, m), length, stream.words)
        if fitted is not None:
            m, n = fitted
            text, offsets = build(stream, m)
            return text, n, offsets
        chars *= 2


# -- the tasks ---------------------------------------------------------------------------------------

def _key(rng, words) -> str:
    return f"{_pick(rng, words['adjective'])}-{_pick(rng, words['noun'])}"


def _value(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _needle(key: str, value: str) -> tuple[str, int]:
    text = f"One of the special magic numbers for {key} is: {value}."
    return text, text.rindex(value)


def _niah(task: str, rng, depth: float) -> _Draft:
    words = word_lists()
    n_keys = {"niah_single": 1, "niah_multikey": NEEDLES, "niah_multivalue": 1, "niah_multiquery": NEEDLES}[task]
    keys = list(dict.fromkeys(_key(rng, words) for _ in range(8 * n_keys)))[:n_keys]
    n_values = NEEDLES if task == "niah_multivalue" else 1
    values = list(dict.fromkeys(_value(rng) for _ in range(8 * NEEDLES)))[:n_keys * n_values]
    needles, answers = [], []
    depths = [depth] + [float(d) for d in rng.uniform(0, 1, len(values) - 1)]
    queried = keys if task == "niah_multiquery" else keys[:1]
    for i, value in enumerate(values):
        key = keys[i // n_values]
        text, at = _needle(key, value)
        answer = None
        if key in queried:
            answer = len(answers)
            answers.append(value)
        needles.append((depths[i], text, [] if answer is None else [(answer, at)]))
    if task in ("niah_multivalue", "niah_multiquery"):
        keys_text = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + " and " + queried[-1]
        question = f"What are all the special magic numbers for {keys_text} in the text above?"
    else:
        question = f"What is the special magic number for {queried[0]} in the text above?"
    return _Draft(_INTRO["niah"] + "\n\n", f"\n\nQuestion: {question}\nAnswer:", answers, needles, depth)


def _vt(rng, depth: float) -> _Draft:
    names = list(dict.fromkeys("".join(chr(65 + int(c)) for c in rng.integers(0, 26, 5))
                               for _ in range(4 * VT_CHAINS * (VT_HOPS + 1))))
    values = list(dict.fromkeys(str(int(rng.integers(10_000, 100_000))) for _ in range(4 * VT_CHAINS)))
    needles, answers = [], []
    for c in range(VT_CHAINS):
        chain = names[c * (VT_HOPS + 1):(c + 1) * (VT_HOPS + 1)]
        # The chain in text order: the queried one starts at the requested depth, each hop further on.
        start = depth if c == 0 else float(rng.uniform(0, 1))
        depths = np.sort(np.concatenate([[start], rng.uniform(start, 1, VT_HOPS)]))
        for h, name in enumerate(chain):
            text = f"VAR {name} = {values[c]}." if h == 0 else f"VAR {name} = VAR {chain[h - 1]}."
            places = []
            if c == 0:
                places.append((h, 4))                           # "VAR NAME"
                if h > 0:
                    places.append((h - 1, text.rindex(chain[h - 1])))
            needles.append((float(depths[h]), text, places))
        if c == 0:
            answers = list(chain)
    question = f"Which variables are assigned the value {values[0]} in the text above?"
    return _Draft(_INTRO["vt"] + "\n\n", f"\n\nQuestion: {question}\nAnswer:", answers, needles, depth)


def _qa_document(name: str, town: str, rng, words) -> str:
    first = name.split(" ")[0]
    sentences = [f"{name} lives in {town}."]
    for _ in range(int(rng.integers(2, 5))):
        frame = _FRAMES[rng.integers(len(_FRAMES))]
        sentences.append(frame.format(a=_pick(rng, words["adjective"]), n=_pick(rng, words["noun"]),
                                      m=_pick(rng, words["noun"])).replace("The ", f"{first}'s ", 1))
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def _qa(rng, depth: float) -> tuple[_Draft, Callable[[int], _Stream]]:
    words = word_lists()
    nouns = words["noun"]

    def person(r) -> str:
        return " ".join(w.capitalize() for w in _distinct(r, nouns, 2))

    def town(r) -> str:
        return _pick(r, nouns).capitalize() + _TOWN_SUFFIXES[r.integers(len(_TOWN_SUFFIXES))]

    name, gold_town = person(rng), town(rng)
    gold = _qa_document(name, gold_town, rng, words)
    distractor_seed = int(rng.integers(2**31))

    def documents(n_chars: int) -> _Stream:
        # Its own generator: a longer stream starts with the documents of a shorter one.
        r = np.random.default_rng(distractor_seed)
        docs, total, towns = [], 0, {gold_town}
        while total < n_chars:
            other, t = person(r), town(r)
            if t in towns or other == name:
                continue
            towns.add(t)
            docs.append(_qa_document(other, t, r, words))
            total += len(docs[-1]) + 2
        return _Stream.build(docs, "\n\n", "\n\n")

    question = f"In which town does {name} live?"
    draft = _Draft(_INTRO["qa"] + "\n\n", f"\n\nQuestion: {question}\nAnswer:", [gold_town],
                   [(depth, gold, [(0, gold.index(gold_town))])], depth)
    return draft, documents


def _cwe(tok, rng, length: int, layout: dict) -> tuple[str, int, list[str], list[list[int]]]:
    """(input, tokens, the frequent words, their offsets): a numbered list in which CWE_WORDS words
    appear `often` times each and the others `rarely` (fewer), as long as `length` allows."""
    words = word_lists()
    pool = tuple(w for cat in ("noun", "adjective", "verb") for w in words[cat])
    question = f"What are the {CWE_WORDS} most common words in the list above?"
    head, tail = _INTRO["cwe"] + "\n\n", f"\n\nQuestion: {question}\nAnswer:"
    fixed_text = (head + tail).lower()
    common = []
    while len(common) < CWE_WORDS:
        w = _pick(rng, pool)
        if w not in fixed_text and not any(w in c or c in w for c in common):
            common.append(w)
    rare = [w for w in dict.fromkeys(pool[i] for i in rng.permutation(len(pool)))
            if not any(w in c or c in w for c in common)]
    order_seed = int(rng.integers(2**31))

    def entries(often: int, rarely: int, n_rare: int, n_extra: int) -> list[str]:
        items = [w for w in common for _ in range(often)] + [w for w in rare[:n_rare] for _ in range(rarely)]
        order = np.random.default_rng([order_seed, n_rare]).permutation(len(items))
        return [items[i] for i in order] + rare[n_rare:n_rare + n_extra]

    def text(items: list[str]) -> tuple[str, list[int]]:
        parts, starts, pos = [], [], len(head)
        for i, w in enumerate(items, 1):
            prefix = f"{i}. " if i == 1 else f" {i}. "
            starts.append(pos + len(prefix))
            parts.append(prefix + w)
            pos += len(prefix) + len(w)
        return head + "".join(parts) + tail, starts

    def measure(items):
        return len(encode_prompt(tok, text(items)[0], **layout))

    # RULER's frequencies (30 and 3) where the list is long enough; shorter lists scale the frequent
    # words down so that they take at most half of it, and still outnumber every other word.
    per_hundred = measure(common * 20) - measure(common * 10)       # the tokens of 100 entries
    budget = (length - measure([])) * 100 // max(1, per_hundred)     # about this many entries fit
    if budget < 2 * CWE_WORDS + 1:
        raise TooShort(f"--lengths: {length} tokens cannot hold cwe: its question and list need at least "
                       f"{measure(common * 2) + 1} tokens of this tokenizer")
    often = int(min(30, max(2, budget // (2 * CWE_WORDS))))
    rarely = min(3, often - 1)
    rarely = max(rarely, math.ceil((budget - often * CWE_WORDS) / max(1, len(rare) - 1)))
    if rarely >= often:
        raise ConfigError(f"--lengths: {length} tokens of cwe need more distinct words than the word lists hold")
    fitted = _fit(lambda u: measure(entries(often, rarely, u, 0)), length, len(rare) - 1)
    if fitted is None:
        raise ConfigError(f"--lengths: {length} tokens of cwe need more distinct words than the word lists hold")
    n_rare = fitted[0]
    extra = _fit(lambda v: measure(entries(often, rarely, n_rare, v)), length, len(rare) - n_rare)
    n_extra = extra[0] if extra is not None else len(rare) - n_rare
    items = entries(often, rarely, n_rare, n_extra)
    full, starts = text(items)
    positions = [[s for s, w in zip(starts, items) if w == c] for c in common]
    return full, measure(items), common, positions


# -- records -----------------------------------------------------------------------------------------

def _rng(seed: int, task: str, length: int, index: int):
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def _depth(index: int, num_samples: int) -> float:
    """Single needles spread evenly over the haystack, first at its start, last at its end."""
    return 0.5 if num_samples == 1 else index / (num_samples - 1)


def make_record(task: str, tok: Tokenizer, length: int, index: int, *, num_samples: int = 1, seed: int = 0,
                haystack: str = "noise", chat: bool = False, mode: str | None = None) -> dict:
    """Record `index` of `num_samples` of one task at one length (see the module docstring)."""
    if task not in TASKS:
        raise ConfigError(f"--tasks: unknown task {task!r}; expected some of {list(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ConfigError(f"--haystack: expected one of {HAYSTACKS}, got {haystack!r}")
    if not (isinstance(length, int) and length > 0):
        raise ConfigError(f"--lengths: must be positive integers, got {length!r}")
    layout = {"chat": chat, "mode": mode}
    encode_prompt(tok, "", **layout)            # a mode the tokenizer lacks is named before any work
    rng = _rng(seed, task, length, index)
    for _ in range(ATTEMPTS):
        depth: float | None = _depth(index, num_samples)
        if task == "cwe":
            text, tokens, answers, positions = _cwe(tok, rng, length, layout)
            needles, depth = [], None
        else:
            if task == "qa":
                draft, make_stream = _qa(rng, depth)
            else:
                draft = _vt(rng, depth) if task == "vt" else _niah(task, rng, depth)
                noise_seed = int(rng.integers(2**31))
                make_stream = (_noise_stream if haystack == "noise"
                               else (lambda n: _words_stream(np.random.default_rng(noise_seed), n)))
            text, tokens, offsets = _fill_stream(tok, draft, make_stream, length, layout, task)
            answers = draft.answers
            positions = [[] for _ in answers]
            for (_, _, places), at in zip(draft.needles, offsets):
                for a, off in places:
                    positions[a].append(at + off)
            positions = [sorted(p) for p in positions]
            # Depth as RULER means it: the share of the filler's tokens before the needle (the
            # introduction, the question and the needles themselves left out).
            first, last = len(tok.encode(draft.head)), len(tok.encode(text[:len(text) - len(draft.tail)]))
            needles = sorted(({"text": needle_text, "char": at, "token": len(tok.encode(text[:at]))}
                              for (_, needle_text, _), at in zip(draft.needles, offsets)), key=lambda n: n["char"])
            sizes = [len(tok.encode(n["text"])) for n in needles]
            filler = max(1, last - first - sum(sizes))
            for j, n in enumerate(needles):
                n["depth"] = round(min(1.0, max(0.0, (n["token"] - first - sum(sizes[:j])) / filler)), 4)
        # A draw whose answer also turns up elsewhere (a variable name inside a filler word, say)
        # would let a string match find it there: draw again.
        if all(occurrences(text, a) == p for a, p in zip(answers, positions)):
            return {"input": text, "answers": answers, "task": task, "length": length, "tokens": tokens,
                    "index": index, "seed": seed, "depth": depth, "needles": needles, "positions": positions,
                    "metric": TASKS[task].metric, "max_new_tokens": TASKS[task].max_new_tokens, "chat": chat,
                    "mode": mode, "haystack": "documents" if task == "qa" else "list" if task == "cwe" else haystack}
    raise RuntimeError(f"{task} at {length} tokens, record {index}: no draw in {ATTEMPTS} kept its answers apart "
                       "from the rest of its text")


def make_records(task: str, tok: Tokenizer, length: int, num_samples: int, **kw) -> list[dict]:
    return [make_record(task, tok, length, i, num_samples=num_samples, **kw) for i in range(num_samples)]


def task_file(out_dir: str | os.PathLike, task: str, length: int) -> storage.AnyPath:
    return storage.as_path(out_dir) / f"{task}_{length}.jsonl"


def _write_jsonl(path: storage.AnyPath, rows: Iterable[dict]) -> None:
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows), parents=True)


def write_tasks(out_dir: str | os.PathLike, tok: Tokenizer, *, tasks: Sequence[str] = TASK_NAMES,
                lengths: Sequence[int], num_samples: int, progress: Callable[[int], None] | None = None,
                **kw) -> list[storage.AnyPath]:
    """One JSONL file per task and length, `OUT_DIR/{task}_{length}.jsonl` (a folder or a gs://
    prefix); their paths."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"--tasks: unknown {unknown}; expected some of {list(TASKS)}")
    if not (isinstance(num_samples, int) and num_samples > 0):
        raise ConfigError(f"--samples: must be a positive integer, got {num_samples!r}")
    paths = []
    for length in lengths:
        for task in tasks:
            records = []
            for i in range(num_samples):
                records.append(make_record(task, tok, length, i, num_samples=num_samples, **kw))
                if progress:
                    progress(1)
            path = task_file(out_dir, task, length)
            _write_jsonl(path, records)
            paths.append(path)
    return paths


def sft_record(record: dict) -> dict:
    """A generated record as a training conversation (`data.kind=sft`): its input as the user's
    turn, its answers (joined by ", ") as the model's. Generated with `chat=True`, the record's
    length is that of the encoder input the conversation becomes."""
    return {"messages": [{"role": "user", "content": record["input"]},
                         {"role": "model", "content": ", ".join(record["answers"])}]}


def write_sft(paths: Sequence[str | os.PathLike]) -> list[storage.AnyPath]:
    """Beside each generated file, `{task}_{length}.sft.jsonl`: its records as conversations to
    train on (scoring reads only the generated files, so these never count as evaluation data)."""
    out = []
    for path in map(storage.as_path, paths):
        target = path.with_name(path.stem + ".sft.jsonl")
        _write_jsonl(target, map(sft_record, read_records(path)))
        out.append(target)
    return out


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of one generated file; ConfigError naming the file and line of one that is not."""
    out = []
    try:
        lines = storage.read_text(path).splitlines()
    except OSError as e:
        raise ConfigError(f"--data: cannot read {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--data: {path}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in ("input", "answers", "task", "length", "metric")
                   if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ConfigError(f"--data: {path}:{n}: not a long-context task record (no {', '.join(missing)})")
        answers = rec["answers"]
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a for a in answers)):
            raise ConfigError(f"--data: {path}:{n}: 'answers' must be a non-empty list of strings")
        if rec["metric"] not in METRICS:
            raise ConfigError(f"--data: {path}:{n}: unknown metric {rec['metric']!r}; expected one of {METRICS}")
        out.append(rec)
    if not out:
        raise ConfigError(f"--data: {path} holds no record")
    return out


# -- lm-evaluation-harness tasks ---------------------------------------------------------------------

LM_EVAL_HOOK = "ruler_metric"     # the module lm-eval loads beside the YAMLs for `process_results`


def lm_eval_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's `process_results` for a generated record: RULER's string match of the completion, in
    percent (the unit of the scorer's table)."""
    return {"string_match": 100.0 * score(results[0], doc)}


def lm_eval_task_name(task: str, length: int) -> str:
    return f"ruler_{task}_{length}"


def write_lm_eval_tasks(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """One lm-eval `generate_until` task YAML per generated file (`ruler_{task}_{length}`, tagged
    `ruler`, `ruler_{length}` and `ruler_{task}`), reading it with lm-eval's `json` dataset, plus the
    hook module their `process_results` names; the YAML paths. Run them with
    `--include_path OUT_DIR --tasks ruler_4096` (every task at one length) or a task's name."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{LM_EVAL_HOOK}.py").write_text(
        '"""lm-eval\'s hook for the long-context task YAMLs beside it (written by '
        't5gemma2_jax.evaluation.ruler.write_lm_eval_tasks)."""\n\n'
        "from t5gemma2_jax.evaluation.ruler import lm_eval_process_results as process_results  # noqa: F401\n")
    written = []
    for p in paths:
        first = read_records(p)[0]
        task, length = first["task"], int(first["length"])
        config = {
            "task": lm_eval_task_name(task, length),
            "tag": ["ruler", f"ruler_{length}", f"ruler_{task}"],
            "dataset_path": "json",
            # lm-eval's json dataset reads a gs:// file through fsspec as it reads a local one.
            "dataset_kwargs": {"data_files": {"test": str(p) if storage.is_url(p) else str(Path(p).resolve())}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{input}}",
            "doc_to_target": "{{answers | join(', ')}}",
            "generation_kwargs": {"until": [], "max_gen_toks": int(first.get("max_new_tokens") or 32),
                                  "do_sample": False},
            "metric_list": [{"metric": "string_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "length": length, "ruler_metric": first["metric"]},
        }
        path = out / f"{config['task']}.yaml"
        # yaml cannot emit lm-eval's `!function` tag from a dict: that one line is appended as text.
        path.write_text(yaml.safe_dump(config, sort_keys=False, width=1000)
                        + f"process_results: !function {LM_EVAL_HOOK}.process_results\n")
        written.append(path)
    return written

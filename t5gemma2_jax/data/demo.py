"""A deterministic synthetic dataset a tiny model learns visibly on a CPU.

Scenes are one or two coloured shapes (circle, square, triangle) on a plain background, drawn
with PIL. Captions and questions follow small templates, so a tiny model's loss drops within a
couple hundred steps, and a vision tower can learn colours and positions.

Files (JSONL, the formats the trainer reads):
  pretrain_train.jsonl / pretrain_eval.jsonl  {"text": ..., "images": [...]} (about half with
      an image, either marked with <start_of_image> or first by default; the rest text-only
      descriptions)
  sft_train.jsonl / sft_eval.jsonl  {"messages": [{"role": "user", "content": ...,
      "images": [...]}, {"role": "model", "content": ...}, ...]} (one or two Q/A turns)
  qa_train.jsonl  {"messages": [{"role": "user", "content": caption + " " + question},
      {"role": "model", "content": answer}]} (text-only chat records, two questions per scene:
      the answer is the decoder target, as the demo asks it; `qa_items` gives questions about
      held-out scenes with their candidate answers to score a model on)

Images are inline `data:image/png;base64,...` strings by default (one self-contained file per
split), or PNG files referenced by relative path (`image_files=True`).
`demo_paths()` builds the dataset once into the cache and returns its paths. `MixedBatches`
interleaves the batches of several pipelines (the demo: UL2 pretraining on the scenes and SFT on
the questions, in one run).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from t5gemma2_jax.data.cache import atomic_write_bytes, cache_dir

DEMO_VERSION = 2
CANVAS = 48

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 205, 40), "purple": (145, 60, 185), "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (150, 150, 150), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
NUMBERS = ("zero", "one", "two")


@dataclass(frozen=True)
class Shape:
    color: str
    kind: str


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # one or two
    relation: str | None  # shapes[0] <relation> shapes[1]

    def caption(self) -> str:
        a = self.shapes[0]
        if len(self.shapes) == 1:
            return f"a {a.color} {a.kind} on a {self.background} background."
        b = self.shapes[1]
        return f"a {a.color} {a.kind} {self.relation} a {b.color} {b.kind} on a {self.background} background."

    def description(self) -> str:
        """A text-only paraphrase (no image) with the inverse relation, for pretraining."""
        a = self.shapes[0]
        if len(self.shapes) == 1:
            return f"there is one shape. the {a.kind} is {a.color}. the background is {self.background}."
        b = self.shapes[1]
        inverse = RELATIONS[self.relation]
        return (f"there are two shapes. the {a.color} {a.kind} is {self.relation} the {b.color} "
                f"{b.kind}. the {b.color} {b.kind} is {inverse} the {a.color} {a.kind}.")


def random_scene(rng: random.Random) -> Scene:
    n = 1 if rng.random() < 0.35 else 2
    colors = rng.sample(sorted(COLORS), n)
    kinds = [rng.choice(SHAPES) for _ in range(n)]
    return Scene(background=rng.choice(sorted(BACKGROUNDS)),
                 shapes=tuple(Shape(c, k) for c, k in zip(colors, kinds)),
                 relation=rng.choice(sorted(RELATIONS)) if n == 2 else None)


def render(scene: Scene, rng: random.Random, size: int = CANVAS) -> bytes:
    """PNG bytes of the scene; positions jitter but respect the relation."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    r = size // 7  # half-size of a shape
    centres = []
    if len(scene.shapes) == 1:
        centres.append((rng.randint(r + 2, size - r - 3), rng.randint(r + 2, size - r - 3)))
    else:
        lo, hi = (r + 2, size // 2 - 2), (size // 2 + 2, size - r - 3)
        a_range, b_range = {"above": (lo, hi), "below": (hi, lo),
                            "left of": (lo, hi), "right of": (hi, lo)}[scene.relation]
        vertical = scene.relation in ("above", "below")
        free = (r + 2, size - r - 3)
        for rng_main in (a_range, b_range):
            main = rng.randint(max(rng_main[0], r + 2), min(rng_main[1], size - r - 3))
            other = rng.randint(*free)
            centres.append((other, main) if vertical else (main, other))
    for shape, (cx, cy) in zip(scene.shapes, centres):
        color = COLORS[shape.color]
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape.kind == "circle":
            draw.ellipse(box, fill=color)
        elif shape.kind == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs about the scene, in random order."""
    a = scene.shapes[0]
    qa = [("describe the image.", scene.caption()),
          ("how many shapes are there?", f"{NUMBERS[len(scene.shapes)]}."),
          ("what color is the background?", f"{scene.background}."),
          (f"what color is the {a.kind}?", f"{a.color}.") if
          sum(s.kind == a.kind for s in scene.shapes) == 1 else
          (f"which shapes are {a.kind}s?", f"the {' and the '.join(s.color + ' one' for s in scene.shapes)}."),
          (f"which shape is {a.color}?", f"the {a.kind}.")]
    if len(scene.shapes) == 2:
        b = scene.shapes[1]
        qa.append((f"where is the {a.color} {a.kind}?", f"{scene.relation} the {b.color} {b.kind}."))
        qa.append((f"where is the {b.color} {b.kind}?",
                   f"{RELATIONS[scene.relation]} the {a.color} {a.kind}."))
    rng.shuffle(qa)
    return qa


@dataclass(frozen=True)
class QAItem:
    """A question about a scene described by `context`, its answer among `candidates`; `kind`
    is what it asks: "background", "shape", "colour" or "relation"."""

    context: str
    question: str
    answer: str
    candidates: tuple[str, ...]
    kind: str = ""


QA_KINDS = ("background", "shape", "colour", "relation")


def qa_pairs(scene: Scene) -> list[QAItem]:
    """The questions of `questions()` whose answer is one of a small closed set (colour, shape,
    background, relation), each with every answer of that set."""
    a, ctx = scene.shapes[0], scene.caption()
    items = [QAItem(ctx, "what color is the background?", f"{scene.background}.",
                    tuple(f"{c}." for c in sorted(BACKGROUNDS)), "background"),
             QAItem(ctx, f"which shape is {a.color}?", f"the {a.kind}.", tuple(f"the {k}." for k in SHAPES),
                    "shape")]
    colors = tuple(f"{c}." for c in sorted(COLORS))
    for s in scene.shapes:
        if sum(o.kind == s.kind for o in scene.shapes) == 1:
            items.append(QAItem(ctx, f"what color is the {s.kind}?", f"{s.color}.", colors, "colour"))
    if len(scene.shapes) == 2:
        b = scene.shapes[1]
        items.append(QAItem(ctx, f"where is the {a.color} {a.kind}?", f"{scene.relation} the {b.color} {b.kind}.",
                            tuple(f"{r} the {b.color} {b.kind}." for r in sorted(RELATIONS)), "relation"))
    return items


def qa_records(n: int, seed: int, image_dir: Path | None = None) -> list[dict]:
    """`n` text-only chat records, two per scene: the caption and a question in the user turn,
    its answer in the model turn (the format `scripts/demo.py` asks questions in)."""
    del image_dir  # no images: the scene is in the text
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        scene = random_scene(rng)
        for q in rng.sample(qa_pairs(scene), 2)[: n - len(out)]:
            out.append({"messages": [{"role": "user", "content": f"{q.context} {q.question}"},
                                     {"role": "model", "content": q.answer}]})
    return out


def scene_caption(record: dict) -> str:
    """The caption of the scene a pretraining or question record is about."""
    text = record["messages"][0]["content"] if "messages" in record else record["text"]
    return text.replace("<start_of_image>", "").split(" background.")[0] + " background."


def split_captions(path: str | os.PathLike) -> set[str]:
    """The scene captions of a pretraining or question split (JSONL): what held-out means."""
    with open(path, encoding="utf-8") as f:
        return {scene_caption(json.loads(line)) for line in f if line.strip()}


def qa_items(n: int, seed: int = 6, exclude: set[str] = frozenset()) -> list[QAItem]:
    """`n` questions about new scenes (their captions not in `exclude`), one per scene."""
    rng = random.Random(seed)
    out: list[QAItem] = []
    for _ in range(100 * n):
        scene = random_scene(rng)
        if scene.caption() in exclude:
            continue
        out.append(rng.choice(qa_pairs(scene)))
        if len(out) == n:
            break
    return out


def _image_ref(png: bytes, index: int, image_dir: Path | None) -> str:
    if image_dir is None:
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    name = f"{index:06d}.png"
    (image_dir / name).write_bytes(png)
    return f"{image_dir.name}/{name}"


def pretrain_records(n: int, seed: int, image_dir: Path | None = None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        style = rng.random()
        if style < 0.25:  # marker says where the image goes
            ref = _image_ref(render(scene, rng), i, image_dir)
            out.append({"text": "<start_of_image>" + scene.caption(), "images": [ref]})
        elif style < 0.5:  # no marker: the image comes first
            ref = _image_ref(render(scene, rng), i, image_dir)
            out.append({"text": scene.caption(), "images": [ref]})
        else:  # text only
            out.append({"text": scene.caption() + " " + scene.description()})
    return out


def sft_records(n: int, seed: int, image_dir: Path | None = None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        qa = questions(scene, rng)
        turns = 1 if rng.random() < 0.7 else 2
        ref = _image_ref(render(scene, rng), i, image_dir)
        messages = []
        for t in range(turns):
            q, a = qa[t]
            user = {"role": "user", "content": q}
            if t == 0:
                user["images"] = [ref]
            messages += [user, {"role": "model", "content": a}]
        out.append({"messages": messages})
    return out


def text_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Text-only lines covering the demo vocabulary (for training the tiny tokenizer)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        scene = random_scene(rng)
        lines += [scene.caption(), scene.description()]
        lines += [f"{q} {a}" for q, a in questions(scene, rng)]
    return lines


SPLITS = {  # name -> (records function, number, seed)
    "pretrain_train": (pretrain_records, 2000, 1),
    "pretrain_eval": (pretrain_records, 200, 2),
    "sft_train": (sft_records, 2000, 3),
    "sft_eval": (sft_records, 200, 4),
    "qa_train": (qa_records, 4000, 5),
}


def write_demo_dataset(out_dir: str | os.PathLike, *, image_files: bool = False,
                       scale: float = 1.0) -> dict[str, str]:
    """Writes the JSONL splits into `out_dir`; returns {split: path}. Deterministic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (make, n, seed) in SPLITS.items():
        image_dir = None
        if image_files:
            image_dir = out / f"{name}_images"
            image_dir.mkdir(exist_ok=True)
        records = make(max(1, int(n * scale)), seed, image_dir)
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        path = out / f"{name}.jsonl"
        atomic_write_bytes(path, data.encode("utf-8"))
        paths[name] = str(path)
    return paths


def demo_split_paths() -> dict[str, str]:
    """{split: JSONL path} of the demo dataset, generated once into the cache."""
    root = cache_dir() / f"demo-v{DEMO_VERSION}"
    want = {s: root / f"{s}.jsonl" for s in SPLITS}
    if not all(p.exists() for p in want.values()):
        write_demo_dataset(root)
    return {s: str(p) for s, p in want.items()}


def demo_paths(kind: str = "pretrain") -> tuple[str, str]:
    """(train, eval) JSONL paths of the demo dataset for `kind`, generated once into the cache."""
    paths = demo_split_paths()
    return paths[f"{kind}_train"], paths[f"{kind}_eval"]


class MixedBatches:
    """The batches of several sources in a fixed repeating order (`pattern` [0, 1]: one of each
    in turn), with the trainer's batch-source interface: `get_state` / `set_state` (JSON, so a
    resumed run continues every source where it stopped), `stats` (the counters summed), and
    `skip_summary` / `close`. The sources must give batches of one shape (same data lengths)."""

    def __init__(self, sources, pattern=(0, 1)):
        self.sources, self.pattern = list(sources), [int(i) for i in pattern]
        if not self.pattern or not all(0 <= i < len(self.sources) for i in self.pattern):
            raise ValueError(f"pattern {self.pattern} must index the {len(self.sources)} sources")
        self.index = 0

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> dict:
        source = self.sources[self.pattern[self.index % len(self.pattern)]]
        batch = next(source)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index, "sources": [s.get_state() for s in self.sources]}

    def set_state(self, state: dict | str | bytes) -> None:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"state of {len(state['sources'])} sources, not {len(self.sources)}")
        for source, s in zip(self.sources, state["sources"]):
            source.set_state(s)
        self.index = int(state["index"])

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for source in self.sources:
            for k, v in source.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    def skip_summary(self) -> str:
        return "; ".join(s.skip_summary() for s in self.sources if hasattr(s, "skip_summary"))

    def close(self) -> None:
        for source in self.sources:
            if hasattr(source, "close"):
                source.close()

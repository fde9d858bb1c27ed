"""The demo's question/answer data: answers are among their candidates and held-out scenes are new."""

import random

from t5gemma2_jax.data.demo import COLORS, SHAPES, qa_items, qa_pairs, qa_records, random_scene


def test_every_answer_is_one_candidate_and_matches_the_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        for item in qa_pairs(scene):
            assert item.candidates.count(item.answer) == 1 and item.context == scene.caption()
            if item.question.startswith("what color is the ") and "background" not in item.question:
                kind = item.question.removeprefix("what color is the ").rstrip("?")
                assert item.answer == [s.color for s in scene.shapes if s.kind == kind][0] + "."
                assert len(item.candidates) == len(COLORS)
            if item.question.startswith("which shape is "):
                assert len(item.candidates) == len(SHAPES)


def test_records_are_deterministic_and_held_out_scenes_are_new():
    train = qa_records(300, seed=5)
    assert train == qa_records(300, seed=5) and train != qa_records(300, seed=6)
    text = train[0]["text"]
    assert text.count("?") == 2 and text.endswith(".")
    seen = {r["text"].split(" background.")[0] + " background." for r in train}
    items = qa_items(40, exclude=seen)
    assert len(items) == 40 and not {i.context for i in items} & seen
    assert len({i.question.split()[0] for i in items}) >= 2     # several kinds of question

"""The demo's question/answer data: answers are among their candidates, held-out scenes are new,
training asks the questions exactly as the demo's evaluation does, and `MixedBatches` interleaves
two pipelines and resumes them where they stopped."""

import dataclasses
import random

import numpy as np
import pytest

from data_test_helpers import tok  # noqa: F401  (fixture)
from t5gemma2_jax.data import DataConfig, make_pipeline
from t5gemma2_jax.data.demo import (COLORS, QA_KINDS, SHAPES, MixedBatches, qa_items, qa_pairs, qa_records,
                                    random_scene, split_captions, write_demo_dataset)
from t5gemma2_jax.data.prompts import encode_prompt


def test_every_answer_is_one_candidate_and_matches_the_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        for item in qa_pairs(scene):
            assert item.candidates.count(item.answer) == 1 and item.context == scene.caption()
            assert item.kind in QA_KINDS
            if item.kind == "colour":
                kind = item.question.removeprefix("what color is the ").rstrip("?")
                assert item.answer == [s.color for s in scene.shapes if s.kind == kind][0] + "."
                assert len(item.candidates) == len(COLORS)
            if item.kind == "shape":
                assert len(item.candidates) == len(SHAPES)


def test_records_are_deterministic_chat_turns_and_held_out_scenes_are_new(tmp_path):
    train = qa_records(300, seed=5)
    assert len(train) == 300 and train == qa_records(300, seed=5) and train != qa_records(300, seed=6)
    user, model = train[0]["messages"]
    assert (user["role"], model["role"]) == ("user", "model")
    assert user["content"].count("?") == 1 and user["content"].endswith("?") and model["content"].endswith(".")
    paths = write_demo_dataset(tmp_path, scale=0.05)
    seen = split_captions(paths["pretrain_train"]) | split_captions(paths["qa_train"])
    assert len(seen) > 100 and all(c.endswith(" background.") and "<" not in c for c in seen)
    items = qa_items(40, exclude=seen)
    assert len(items) == 40 and not {i.context for i in items} & seen
    assert {i.kind for i in items} == set(QA_KINDS)     # every kind of question


def test_training_asks_the_question_as_the_evaluation_does(tok):  # noqa: F811
    """The SFT pipeline's encoder input for a question record is the demo's prompt
    (`encode_prompt(chat=True)`), and its target is the candidate's tokens, then eos."""
    item = qa_items(1)[0]
    record = {"messages": [{"role": "user", "content": f"{item.context} {item.question}"},
                           {"role": "model", "content": item.answer}]}
    cfg = DataConfig(kind="sft", batch_size=1, encoder_length=96, decoder_length=32, max_images_per_row=0)
    b = next(make_pipeline(cfg, "eval", records=[record], tokenizer=tok))
    enc = b["encoder_input_ids"][0][b["encoder_segment_ids"][0] == 1]
    target = b["decoder_target_ids"][0][b["decoder_segment_ids"][0] == 1]
    np.testing.assert_array_equal(enc, encode_prompt(tok, f"{item.context} {item.question}", chat=True))
    np.testing.assert_array_equal(target, [*tok.encode(item.answer), tok.special.eos])


def test_mixed_batches_interleave_and_resume(tok):  # noqa: F811
    pre = DataConfig(kind="pretrain", batch_size=2, encoder_length=64, decoder_length=32, max_images_per_row=0,
                     ul2_denoisers="S:1")
    sft = dataclasses.replace(pre, kind="sft")
    texts = [{"text": f"a red circle on a black background number {i}."} for i in range(30)]
    chats = qa_records(30, seed=1)

    def mixed():
        return MixedBatches([make_pipeline(pre, "train", records=texts, tokenizer=tok),
                             make_pipeline(sft, "train", records=chats, tokenizer=tok)], pattern=(0, 1, 1))

    a = mixed()
    first = [next(a) for _ in range(4)]
    sft_start = tok.special.start_of_turn
    assert [bool((f["encoder_input_ids"] == sft_start).any()) for f in first] == [False, True, True, False]
    state = a.get_state()
    want = [next(a) for _ in range(3)]
    b = mixed()
    b.set_state(state)
    for x, y in zip(want, [next(b) for _ in range(3)]):
        np.testing.assert_array_equal(x["encoder_input_ids"], y["encoder_input_ids"])
    assert b.stats()["examples"] == a.stats()["examples"] > 0
    with pytest.raises(ValueError, match="pattern"):
        MixedBatches([a], pattern=(0, 1))

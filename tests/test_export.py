"""The params export: one layout for training, adaptation and generation, checked on load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.export import flat_params, load_export_arrays, save_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("export")
    model = tg.T5Gemma2(tg.preset("tiny"), rngs=nnx.Rngs(1))
    save_export(path, model.config, flat_params(model))
    return path, model


def test_round_trip_with_runtime_overrides(exported):
    path, model = exported
    loaded = tg.load_export(path, remat="full", attention_block_size=64)
    assert loaded.config == model.config.replace(remat="full", attention_block_size=64)
    want, got = flat_params(model), flat_params(loaded)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def test_a_text_only_model_reads_a_subset_and_a_mismatch_is_listed(exported):
    path, _ = exported
    text = tg.load_export(path, with_vision=False)
    assert text.vision is None
    shapes = {n: v for n, v in flat_params(text).items()}
    wrong = {**{n: v for n, v in shapes.items()}, "embedder.table": np.zeros((7, 64), np.float32),
             "decoder.norm.extra": np.zeros((3,), np.float32)}
    import jax
    abstract = {n: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for n, v in wrong.items()}
    with pytest.raises(tg.CheckpointError, match=r"missing parameters \(1\): \['decoder\.norm\.extra'\]\n"
                                                 r"  shape mismatches \(1\): \['embedder\.table: checkpoint "
                                                 r"\(512, 64\)"):
        load_export_arrays(path, abstract)


def test_not_an_export_is_named(tmp_path, exported):
    with pytest.raises(tg.CheckpointError, match="not a params export"):
        tg.load_export(tmp_path)
    path, _ = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_config.json").write_text(json.dumps({"colour": 1}))
    with pytest.raises(tg.CheckpointError, match=r"not a valid model config .*colour: unknown key"):
        tg.load_export(bad)

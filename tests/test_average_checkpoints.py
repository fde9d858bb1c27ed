"""scripts/average_checkpoints.py: the export of two steps of a tiny run is their elementwise mean
and loads through `load`; checkpoints of other shapes and too few checkpoints are one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.export import flat_params, save_export
from scripts_loader import load_script

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from helpers import small_config  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from t5gemma2_jax.train import train

    workdir = tmp_path_factory.mktemp("avg_run")
    train(small_config(train={"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2}), workdir)
    return workdir


@pytest.mark.slow       # the fixture trains a tiny run: about a minute on a loaded 2-core CPU
def test_average_of_the_last_two_steps_is_their_elementwise_mean(run, tmp_path):
    out = tmp_path / "avg"
    assert load_script("average_checkpoints").main([str(run), "--last", "2", "--out", str(out)]) == 0
    a = flat_params(tg.load(run / "checkpoints" / "2"))
    b = flat_params(tg.load(run / "checkpoints" / "4"))
    assert tg.find_source(out).kind == "export"
    model = tg.load(out)
    avg = flat_params(model)
    assert set(avg) == set(a) and any(not np.array_equal(a[n], b[n]) for n in a)
    for name in a:
        want = (np.asarray(a[name], np.float32) + np.asarray(b[name], np.float32)) / 2
        np.testing.assert_array_equal(np.asarray(avg[name]), want.astype(avg[name].dtype), err_msg=name)
    ids = np.array([[2, 10, 11, 12]])
    assert np.isfinite(np.asarray(model(ids, ids).logits)).all()
    assert tg.load_tokenizer_for(out, model.config).vocab_size == model.config.vocab_size
    # the other readers of a checkpoint path: train.init_from and generate.py
    from t5gemma2_jax.experiment import load_config

    cfg = load_config(None, [f"train.init_from={out}", "data.max_images_per_row=0",
                             "model.encoder.num_layers=2", "model.decoder.num_layers=2"])
    assert cfg.model_config().architecture_differences(model.config) == []
    text = load_script("generate").generate_text(["--checkpoint", str(out), "--prompt", "a red circle",
                                                  "--max-new-tokens", "3"])
    assert isinstance(text, str)


@pytest.mark.slow
def test_mismatched_shapes_and_too_few_checkpoints_are_one_line_errors(run, tmp_path, capsys):
    from flax import nnx

    cfg = tg.load(run).config
    wider = cfg.replace(encoder=cfg.encoder.replace(intermediate_size=2 * cfg.encoder.intermediate_size),
                        decoder=cfg.decoder.replace(intermediate_size=2 * cfg.decoder.intermediate_size))
    other = save_export(tmp_path / "wider", wider, flat_params(tg.T5Gemma2(wider, rngs=nnx.Rngs(1))))
    script = load_script("average_checkpoints")
    for argv, words in (([str(run / "checkpoints" / "4"), str(other)], "cannot average checkpoints of different shapes"),
                        ([str(run), "--last", "3"], "2 complete checkpoint(s) [2, 4], fewer than --last 3"),
                        ([str(run / "checkpoints" / "4")], "need at least two checkpoints"),
                        ([str(run), str(tmp_path / "nothing")], "no such directory")):
        assert script.main(argv + ["--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()

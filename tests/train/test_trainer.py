"""`Trainer.build`: the one build path compiles from abstract shapes, checks what it is fed, and
starts from pretrained weights whose config differs only in runtime fields."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from helpers import batch_for, small_config
from t5gemma2_jax.checkpoints.export import flat_params, save_export
from t5gemma2_jax.config import ConfigError
from t5gemma2_jax.model import T5Gemma2
from t5gemma2_jax.train import Trainer


def test_compiles_before_any_batch_and_refuses_a_batch_of_other_shapes():
    cfg = small_config()
    trainer = Trainer.build(cfg)
    assert trainer.batch_shapes["encoder_input_ids"].shape == (8, 32)
    assert trainer.batch_shapes["decoder_loss_weights"].dtype == np.float32
    steps = trainer.compile()                     # no batch exists yet
    state, metrics = steps.train(trainer.init_state(), trainer.place_batch(batch_for(cfg)))
    assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
    wrong = dict(batch_for(cfg), decoder_input_ids=np.zeros((8, 17), np.int32))
    with pytest.raises(ValueError, match=r"decoder_input_ids: got \(\(8, 17\), dtype\('int32'\)\), expected "
                                         r"\(\(8, 16\), dtype\('int32'\)\)"):
        trainer.place_batch(wrong)
    with pytest.raises(ValueError, match="encoder_positions: got None"):
        trainer.place_batch({k: v for k, v in batch_for(cfg).items() if k != "encoder_positions"})


def test_pretrained_weights_load_across_runtime_fields_only(tmp_path):
    source = small_config()
    model = T5Gemma2(source.model_config(), rngs=nnx.Rngs(3))
    save_export(tmp_path / "export", model.config, flat_params(model))
    # attention_block_size, remat and the backend change how the model runs, not its weights.
    runtime = small_config(model={"attention_block_size": 8, "remat": "full", "attention_backend": "blockwise"})
    state = Trainer.build(runtime).state_from_pretrained(str(tmp_path / "export"))
    want = flat_params(model)
    for name, value in state["params"].items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]), err_msg=name)
    assert int(state["step"]) == 0
    other = small_config(model={"decoder": {"intermediate_size": 96}})
    with pytest.raises(ConfigError, match=r"different architecture.*decoder\.intermediate_size: checkpoint 128 "
                                          r"!= config 96"):
        Trainer.build(other).state_from_pretrained(str(tmp_path / "export"))

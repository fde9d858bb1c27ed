"""configs/paper_recipe_*.yaml: T5Gemma 2's pretraining recipe loads and builds at each size, holds
the values its comments cite, and every value it sets says where it comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from t5gemma2_jax.data.config import parse_denoisers
from t5gemma2_jax.experiment import load_config
from t5gemma2_jax.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = {"270m-270m": 3.0e-4, "1b-1b": 2.0e-4, "4b-4b": 1.0e-4}


@pytest.mark.parametrize("size", SIZES)
def test_the_recipe_loads_builds_and_has_its_cited_values(size):
    cfg = load_config(CONFIGS / f"paper_recipe_{size}.yaml")
    model = cfg.model_config()
    assert cfg.model.preset == size and model.with_vision and model.dtype == "bfloat16"
    d, o, t = cfg.data, cfg.optim, cfg.train
    # UL2 with five text denoisers, mode tokens; images through the prefix LM only
    assert d.kind == "pretrain" and d.ul2_mode_tokens and d.image_denoisers == "prefix"
    assert d.ul2_denoisers == parse_denoisers("R:3:0.15:0.2,R:8:0.15:0.2,X:3:0.5:0.2,X:64:0.5:0.2,S:0.2")
    assert [x.kind for x in d.ul2_denoisers].count("span") == 4 and d.ul2_denoisers[-1].kind == "prefix"
    # 16K pretraining length, the batch in tokens, ~2T tokens in all
    assert d.encoder_length == 16384 and d.decoder_length == 2048
    tokens_per_step = d.batch_size * (d.encoder_length + d.decoder_length)
    assert tokens_per_step == 2_359_296
    assert abs(t.steps * tokens_per_step - 2e12) / 2e12 < 1e-5
    assert d.mm_tokens_per_image == model.mm_tokens_per_image == 256 and d.image_size == 896
    # warm-up, cosine decay, clipping; the last 5 checkpoints kept for averaging
    assert (o.schedule, o.warmup_steps, o.min_lr_ratio, o.clip_norm) == ("cosine", 2000, 0.1, 1.0)
    assert o.learning_rate == SIZES[size]
    assert (t.keep_checkpoints, t.checkpoint_every, t.keep_best, t.microbatches) == (5, 10000, False, 1)


def test_the_recipe_builds_a_trainer_on_the_compiled_layout():
    """The 270m-270m recipe cut to 2+2 layers and a short length builds its trainer (mesh, state
    shapes, optimizer) on 8 fake CPU devices: the config is usable, not only loadable."""
    cfg = load_config(CONFIGS / "paper_recipe_270m-270m.yaml", [
        "model.encoder.num_layers=2", "model.decoder.num_layers=2", "model.vision.num_layers=1",
        "data.encoder_length=512", "data.decoder_length=64", "data.batch_size=8", "data.num_workers=0",
        "model.attention_backend=dense"])
    trainer = Trainer.build(cfg)
    assert trainer.mesh.size == 8 and trainer.model_config.encoder.num_layers == 2


@pytest.mark.parametrize("size", SIZES)
def test_every_value_the_recipe_sets_says_where_it_comes_from(size):
    """Each value line has its source, or "not stated" and the choice, beside it."""
    text = (CONFIGS / f"paper_recipe_{size}.yaml").read_text().split("\nbase:", 1)[1]
    values = [line for line in text.splitlines()[1:]
              if line.startswith("  ") and not line.lstrip().startswith("#") and line.strip()]
    assert values and all("#" in line for line in values), [v for v in values if "#" not in v]

"""Every ablation variant trains on 8 fake CPU devices, checkpoints, and resumes from it."""

import jax
import numpy as np
import pytest

from t5gemma2_jax.train import read_metrics, train
from helpers import small_config

VARIANTS = {
    "separate_cross_attention": {"cross_attention": "separate"},
    "global_only_cross_attention": {"cross_attention": "global_only"},
    "untied_embeddings": {"embeddings": "untied"},
    "unequal_width_and_depth": {"cross_attention": "separate", "embeddings": "untied",
                                "decoder": {"hidden_size": 48, "intermediate_size": 96, "num_layers": 3,
                                            "layer_types": ["sliding_attention", "sliding_attention",
                                                            "full_attention"]}},
}


# The last variant holds the first and third (separate cross-attention, untied embeddings): those
# two alone run in the heavy tier only.
HEAVY = {"separate_cross_attention", "untied_embeddings"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in VARIANTS])
def test_variant_trains_saves_and_resumes(name, tmp_path):
    assert len(jax.devices()) == 8
    over = dict(VARIANTS[name])
    model = {"preset": "tiny", "encoder": {"num_layers": 2, "layer_types": ["sliding_attention", "full_attention"]},
             "decoder": {"num_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}}
    model["decoder"].update(over.pop("decoder", {}))
    model.update(over)
    cfg = small_config(model=model, train={"steps": 2, "checkpoint_every": 2})
    train(cfg, tmp_path)
    assert (tmp_path / "checkpoints" / "2").is_dir()
    more = small_config(model=model, train={"steps": 4, "checkpoint_every": 2})
    summary = train(more, tmp_path)
    assert summary.start_step == 2                 # resumed from the checkpoint
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(v) for v in losses.values())

"""Small configs and batches shared by the training tests (2+2 layers: quick to compile)."""

from __future__ import annotations

import numpy as np

from t5gemma2_jax.experiment import ExperimentConfig, from_dict
from t5gemma2_jax.train.data import SyntheticBatches, make_batch

LAYERS = {"num_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}


def small_config(*, images: bool = False, **sections) -> ExperimentConfig:
    """Tiny preset cut to 2+2 layers, synthetic data 8 x (32 enc, 16 dec); `sections` are merged
    into the raw config dict (e.g. train={"steps": 4})."""
    raw = {
        "model": {"preset": "tiny", "encoder": dict(LAYERS), "decoder": dict(LAYERS)},
        "data": {"encoder_length": 32 if not images else 48, "decoder_length": 16, "batch_size": 8,
                 "max_images_per_row": 1 if images else 0},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 2, "b2": 0.98},
        "train": {"steps": 4, "data_source": "synthetic", "log_every": 1, "checkpoint_every": 2,
                  "progress_bar": False, "export_at_end": False, "eval_steps": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def batch_for(cfg: ExperimentConfig, seed: int = 0) -> dict[str, np.ndarray]:
    model = cfg.model_config()
    return make_batch(np.random.default_rng(seed), cfg.data.batch_size, cfg.data.encoder_length,
                      cfg.data.decoder_length, model,
                      max_images=cfg.data.max_images_per_row if model.with_vision else 0)


class ActAt(SyntheticBatches):
    """Synthetic batches that call `action()` while fetching batch `at` (1-based): a fault at a
    known step (a signal, an exception)."""

    def __init__(self, *a, at: int, action, **kw):
        super().__init__(*a, **kw)
        self.at, self.action = at, action

    def __next__(self):
        if self.index + 1 == self.at:
            self.action()
        return super().__next__()

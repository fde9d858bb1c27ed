"""Every attention backend through the paths users take, each equal to `dense`.

A backend checked only as a function can still break once it is traced the way the model traces it
(inside a scan over layers, in a second program, in an ahead-of-time compiled step): splash once
kept a kernel built in one trace and handed its tracers to the next. So each backend runs here
through the plain `model(...)` call at two shapes (the default tier), `generate` (greedy and beam)
and `score` (the slow tier). The trainer's compiled steps and `scripts/evaluate.py` are in
`train/test_backend_training.py`.

splash runs in Pallas interpret mode here, cudnn falls back to blockwise off GPU, and auto's
blockwise threshold is lowered so that it picks blockwise for the encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from backend_cases import BLOCKS, OTHERS, auto_picks_blockwise  # noqa: F401 (an autouse fixture)

LAYERS = dict(num_layers=2, layer_types=("sliding_attention", "full_attention"))


def _model(backend: str) -> tg.T5Gemma2:
    """The tiny preset at 2+2 layers, scanned as the presets are (one block of a local and a global
    layer), windows (8) shorter than every sequence below."""
    cfg = tg.preset("tiny", with_vision=False)
    cfg = cfg.replace(encoder=cfg.encoder.replace(**LAYERS), decoder=cfg.decoder.replace(**LAYERS),
                      attention_backend=backend, attention_block_size=BLOCKS[backend])
    return tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))


def _inputs(T: int, S: int, seed: int):
    r = np.random.default_rng(seed)
    ids, dec = r.integers(7, 512, (2, T)), r.integers(7, 512, (2, S))
    mask, dmask = np.ones((2, T), np.int32), np.ones((2, S), np.int32)
    mask[1, T - 5:] = 0
    dmask[1, S - 3:] = 0
    return ids, dec, mask, dmask


def _calls(model) -> dict[str, np.ndarray]:
    out = {}
    for T, S in ((24, 12), (40, 20)):           # a second shape: a second trace of every program
        ids, dec, mask, dmask = _inputs(T, S, T)
        out[f"logits_{T}"] = np.asarray(model(ids, dec, mask, dmask).logits)[dmask.astype(bool)]
    return out


def _generation_and_score(model) -> dict[str, np.ndarray]:
    ids, dec, mask, dmask = _inputs(24, 12, 0)
    out = {}
    out["greedy"], out["greedy_scores"] = map(np.asarray, tg.generate(model, ids, mask, max_new_tokens=10,
                                                                      return_scores=True))
    out["beam"] = np.asarray(tg.generate(model, ids, mask, max_new_tokens=6, method="beam", num_beams=2))
    out["score"] = np.asarray(tg.score(model, ids, dec, mask, dmask))
    return out


def _assert_equal(got: dict, want: dict) -> None:
    for name, w in want.items():
        if name in ("greedy", "beam"):
            np.testing.assert_array_equal(got[name], w, err_msg=name)
        else:
            np.testing.assert_allclose(got[name], w, atol=2e-5, rtol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def dense_model():
    return _model("dense")


@pytest.mark.parametrize("backend", OTHERS)
def test_plain_call_at_two_shapes_equals_dense(backend, dense_model):
    _assert_equal(_calls(_model(backend)), _calls(dense_model))


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHERS)
def test_generate_greedy_and_beam_and_score_equal_dense(backend, dense_model):
    _assert_equal(_generation_and_score(_model(backend)), _generation_and_score(dense_model))

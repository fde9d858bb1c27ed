"""The attention backends the path tests run against `dense`, with the block size each runs at
(splash tiles are multiples of 128), and the fixture that makes `auto` pick blockwise for these
short sequences (its CPU threshold is 1024 keys)."""

import pytest

from t5gemma2_jax.ops.backends import auto

BLOCKS = {"dense": 512, "blockwise": 8, "splash": 128, "cudnn": 8, "auto": 8}
OTHERS = [b for b in BLOCKS if b != "dense"]


@pytest.fixture(autouse=True)
def auto_picks_blockwise(monkeypatch):
    monkeypatch.setattr(auto, "BLOCKWISE_MIN_KEYS", 2)

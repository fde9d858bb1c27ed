"""Context parallelism (`mesh.context`): the encoder's sequence split across devices gives the
unsplit run's attention, logits, loss, gradients and train step, with packing and images, on 8
fake CPU devices; local layers exchange halos whose size does not grow with the length."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.ops.backends import attend, dense
from t5gemma2_jax.ops.backends import context as context_lib
from t5gemma2_jax.ops.masks import MaskInfo, bidirectional_window
from t5gemma2_jax.parallel import MeshConfig
from t5gemma2_jax.parallel import make_mesh, sharding_rules
from t5gemma2_jax.sharding import axis_rules, length_of, sequence_axis

CONTEXT = MeshConfig(data=1, fsdp=2, context=4, tensor=1)


def packed_masks(B: int, T: int):
    """Segment ids and positions of packed rows whose segments cross the devices' chunk
    boundaries, ending in padding (segment 0)."""
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = [0, 5 + 7 * b, T // 2 + 3, T - 6 - b]
        for s, (lo, hi) in enumerate(zip(cuts, cuts[1:]), start=1):
            seg[b, lo:hi], pos[b, lo:hi] = s, np.arange(hi - lo)
    return jnp.asarray(seg), jnp.asarray(pos)


def _qkv(B, T, H, K, d, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=s).astype(np.float32)) for s in ((B, T, H, d), (B, T, K, d), (B, T, K, d))]


def _under_context(fn, *args, mcfg=CONTEXT):
    mesh = make_mesh(mcfg)
    with jax.set_mesh(mesh), axis_rules(sharding_rules(mcfg)), length_of("encoder_length"):
        return jax.jit(fn)(*args)


@pytest.mark.parametrize("backend,block", [("dense", 512), ("blockwise", 8), ("auto", 512)])
@pytest.mark.parametrize("window", [None, bidirectional_window(8), bidirectional_window(15)])
def test_split_attention_and_its_gradients_equal_the_dense_reference(backend, block, window):
    B, T, H, K, d = 2, 64, 4, 1, 16
    q, k, v = _qkv(B, T, H, K, d)
    seg, pos = packed_masks(B, T)
    mask = MaskInfo(seg, pos, seg, pos, window=window)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * jnp.arange(d, dtype=jnp.float32)).sum()

    split = lambda q, k, v: attend(q, k, v, mask, scale=0.25, backend=backend, block_size=block)  # noqa: E731
    whole = lambda q, k, v: dense.attention(q, k, v, mask, scale=0.25)                          # noqa: E731
    out = _under_context(split, q, k, v)
    grads = _under_context(jax.grad(loss(split), argnums=(0, 1, 2)), q, k, v)
    ref = whole(q, k, v)
    ref_grads = jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g)[real], np.asarray(r)[real], rtol=1e-5, atol=1e-5)


def test_splash_takes_the_halo_offset():
    """The TPU kernel's local mask is shifted by the halo (Pallas interpret mode off TPU)."""
    B, T, H, K, d = 1, 512, 2, 1, 128
    q, k, v = _qkv(B, T, H, K, d, seed=1)
    seg, pos = packed_masks(B, T)
    mask = MaskInfo(seg, pos, seg, pos, window=bidirectional_window(64))
    mcfg = MeshConfig(data=1, fsdp=1, context=4, tensor=-1)
    out = _under_context(lambda q, k, v: attend(q, k, v, mask, scale=0.1, backend="splash", block_size=128),
                         q, k, v, mcfg=mcfg)
    ref = dense.attention(q, k, v, mask, scale=0.1)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_what_is_not_split_runs_whole():
    q, k, v = _qkv(2, 64, 4, 1, 16)
    seg, pos = packed_masks(2, 64)
    assert context_lib.unsupported_reason(q, k, MaskInfo(seg, pos, seg, pos, causal=True), 4)
    assert "divisible" in context_lib.unsupported_reason(q[:, :62], k[:, :62], MaskInfo(seg, pos, seg, pos), 4)
    assert "exceed" in context_lib.unsupported_reason(q, k, MaskInfo(seg, pos, seg, pos, window=(20, 20)), 4)
    assert context_lib.unsupported_reason(q, k, MaskInfo(seg, pos, seg, pos, window=(7, 8)), 4) is None
    mesh = make_mesh(CONTEXT)
    with jax.set_mesh(mesh), axis_rules(sharding_rules(CONTEXT)):
        assert sequence_axis() is None                      # the decoder's length stays whole
        with length_of("encoder_length"):
            assert sequence_axis() == ("context", 4)


def _halo_bytes(hlo: str) -> int:
    """Bytes the compiled program moves with collective-permutes."""
    sizes = {"f32": 4, "s32": 4, "bf16": 2, "pred": 1}
    total = 0
    for m in re.finditer(r"= (\w+)\[([\d,]*)\][^=]*? collective-permute\(", hlo):
        dims = [int(x) for x in m.group(2).split(",") if x]
        total += sizes.get(m.group(1), 4) * int(np.prod(dims))
    return total


def test_local_layers_exchange_a_halo_whose_size_does_not_grow_with_length():
    mask_for = lambda T: (lambda s, p: MaskInfo(s, p, s, p, window=bidirectional_window(8)))(*packed_masks(2, T))  # noqa: E731
    mesh = make_mesh(CONTEXT)
    moved = {}
    for T in (64, 256):
        q, k, v = _qkv(2, T, 4, 1, 16)
        mask = mask_for(T)
        with jax.set_mesh(mesh), axis_rules(sharding_rules(CONTEXT)), length_of("encoder_length"):
            hlo = jax.jit(lambda q, k, v: attend(q, k, v, mask, scale=0.25, backend="blockwise",
                                                 block_size=16)).lower(q, k, v).compile().as_text()
        assert "all-gather" not in hlo
        moved[T] = _halo_bytes(hlo)
    assert moved[64] > 0 and moved[64] == moved[256]


@pytest.mark.slow
@pytest.mark.parametrize("images", [False, True])
def test_train_step_with_context_equals_the_unsplit_step(images):
    from helpers import batch_for, small_config
    from t5gemma2_jax.train import Trainer

    base = dict(images=images, data={"batch_size": 8, "encoder_length": 64 if not images else 96})
    results = {}
    for name, mesh in (("whole", {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}),
                       ("split", {"data": 1, "fsdp": 2, "context": 4, "tensor": 1})):
        cfg = small_config(mesh=mesh, **base)
        trainer = Trainer.build(cfg)
        steps = trainer.compile(with_eval=False)
        state, metrics = steps.train(trainer.init_state(), trainer.place_batch(batch_for(cfg, seed=3)))
        results[name] = (float(metrics["loss"]), float(metrics["grad_norm"]),
                         jax.tree.map(np.asarray, state["params"]))
    (l0, g0, p0), (l1, g1, p1) = results["whole"], results["split"]
    assert l1 == pytest.approx(l0, rel=1e-5) and g1 == pytest.approx(g0, rel=1e-5)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_config_checks_the_split():
    from helpers import small_config

    with pytest.raises(ConfigError, match="data.encoder_length.*divisible by mesh.context=3"):
        small_config(mesh={"context": 3, "fsdp": 1})
    with pytest.raises(ConfigError, match="mesh.context.*fewer than half the sliding window"):
        small_config(mesh={"context": 8, "fsdp": 1}, data={"encoder_length": 24})
    with pytest.raises(ConfigError, match="mesh.rules.embed.*not a mesh axis"):
        MeshConfig(rules={"embed": "sequence"})
    assert dict(sharding_rules(MeshConfig(context=4)))["embed"] == ("fsdp", "context")
    assert dict(sharding_rules(MeshConfig()))["embed"] == "fsdp"


def test_context_traffic_counts_halos_gathers_and_the_decoder_gather():
    from t5gemma2_jax.config import preset
    from t5gemma2_jax.parallel import context_traffic

    m = preset("1b-1b")
    short, long = (context_traffic(m, T, 1, MeshConfig(fsdp=8, context=8)) for T in (32768, 131072))
    assert short["local_halo"] == long["local_halo"] > 0            # a halo per local layer, any length
    assert long["global_gather"] == pytest.approx(4 * short["global_gather"])
    locals_ = sum(t == "sliding_attention" for t in m.encoder.layer_types)
    assert short["local_halo"] == locals_ * (m.encoder.sliding_window - 1) * (2 * m.encoder.head_dim * 2 + 8)
    assert long["decoder_gather"] == 131072 * 7 / 8 * m.encoder.hidden_size * 2
    assert sum(context_traffic(m, 131072, 1, MeshConfig(fsdp=8)).values()) == 0


@pytest.mark.slow
def test_generation_under_a_context_mesh_equals_the_unsplit_generation():
    import dataclasses

    from flax import nnx

    from t5gemma2_jax.config import preset
    from t5gemma2_jax.generation import generate
    from t5gemma2_jax.model import T5Gemma2

    model = T5Gemma2(dataclasses.replace(preset("tiny"), with_vision=False), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(7, 500, (2, 64))
    mask = np.ones((2, 64), np.int32)
    mask[1, 50:] = 0
    ref = np.asarray(generate(model, ids, mask, max_new_tokens=8))
    with jax.set_mesh(make_mesh(CONTEXT)), axis_rules(sharding_rules(CONTEXT)):
        out = np.asarray(generate(model, ids, mask, max_new_tokens=8))
    np.testing.assert_array_equal(out, ref)

"""VisionEncoder structure: parameter counts (eval_shape), logical axes, dtypes, remat, init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_vision_utils import export_entries, fill_random, load_entries, tiny_vision_config
from t5gemma2_jax.checkpoints.hf_vision import vision_hf_entries
from t5gemma2_jax.config import preset
from t5gemma2_jax.vision import SiglipTower, VisionEncoder


def _n_params(module: nnx.Module) -> int:
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.state(module, nnx.Param).flat_state())


def _abstract(cfg) -> VisionEncoder:
    return nnx.eval_shape(lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)))


def test_so400m_parameter_count_without_allocating():
    cfg = preset("270m-270m")
    tower = nnx.eval_shape(lambda: SiglipTower(cfg.vision, rngs=nnx.Rngs(0)))
    leaves = [v.get_value() for _, v in nnx.state(tower, nnx.Param).flat_state()]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    n = _n_params(tower)
    assert n == 416_866_032
    assert round(n / 1e6, 2) == 416.87
    # The projector depends on the text width: 0.74M / 1.33M / 2.95M for the three sizes.
    for name, want in (("270m-270m", 0.74), ("1b-1b", 1.33), ("4b-4b", 2.95)):
        enc = _abstract(preset(name))
        assert round(_n_params(enc.projector) / 1e6, 2) == want
        assert _n_params(enc) == n + _n_params(enc.projector)


def test_full_size_forward_shapes_traced_only():
    cfg = preset("270m-270m", dtype="bfloat16", param_dtype="bfloat16", remat="full")
    enc = _abstract(cfg)
    px = jax.ShapeDtypeStruct((2, 3, 896, 896), jnp.float32)
    out = jax.eval_shape(lambda m, x: m(x), enc, px)
    assert out.shape == (2, 256, 640) and out.dtype == jnp.bfloat16
    hidden = jax.eval_shape(lambda m, x: m.last_hidden_state(x), enc, px)
    assert hidden.shape == (2, 4096, 1152)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_axes(scan_layers):
    cfg = preset("270m-270m", scan_layers=scan_layers)
    enc = _abstract(cfg)
    allowed = {None, "layers", "vision_embed", "vision_mlp", "vision_heads", "vision_head_dim", "embed"}
    for path, var in nnx.state(enc, nnx.Param).flat_state():
        axes = var.get_metadata()["logical_axes"]
        shape = var.get_value().shape
        assert len(axes) == len(shape), (path, axes, shape)
        assert set(axes) <= allowed, (path, axes)
        stacked = scan_layers and "blocks" in path
        assert (axes[0] == "layers") == stacked, (path, axes)
        if stacked:
            assert shape[0] == 27
    kernel = dict(nnx.state(enc, nnx.Param).flat_state())[("projector", "kernel")]
    assert kernel.get_metadata()["logical_axes"] == ("vision_embed", "embed")
    assert kernel.get_value().shape == (1152, 640)


def test_random_init_runs_and_is_finite():
    cfg = tiny_vision_config()
    enc = VisionEncoder(cfg, rngs=nnx.Rngs(0))
    px = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)), jnp.float32)
    out = enc(px)
    assert out.shape == (2, 16, 64) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3
    # Different images -> different features.
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-4


def test_bfloat16_params_and_compute():
    cfg32 = tiny_vision_config()
    cfg16 = tiny_vision_config(dtype="bfloat16", param_dtype="bfloat16")
    m32 = _abstract(cfg32)
    fill_random(m32, seed=3)
    weights = export_entries(m32, vision_hf_entries(cfg32))
    m16 = _abstract(cfg16)
    load_entries(m16, weights, vision_hf_entries(cfg16))
    assert all(v.get_value().dtype == jnp.bfloat16 for _, v in nnx.state(m16, nnx.Param).flat_state())
    px = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)), jnp.float32)
    f = jax.jit(lambda m, x: m(x))
    out16, out32 = f(m16, px), f(m32, px)
    assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
    err = float(jnp.abs(out16.astype(jnp.float32) - out32).max())
    assert err < 0.05 * float(jnp.abs(out32).max())


def _loss(px):
    return lambda m: jnp.sum(jnp.sin(m(px)))


def test_remat_and_scan_do_not_change_gradients():
    base = tiny_vision_config(scan_layers=False)
    ref_model = _abstract(base)
    fill_random(ref_model, seed=5)
    weights = export_entries(ref_model, vision_hf_entries(base))
    px = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32)), jnp.float32)

    def grads(cfg):
        model = _abstract(cfg)
        load_entries(model, weights, vision_hf_entries(cfg))
        g = nnx.jit(nnx.grad(_loss(px)))(model)
        # Compare in HF layout so scanned and unscanned trees line up.
        g_model = _abstract(cfg)
        nnx.update(g_model, g)
        return export_entries(g_model, vision_hf_entries(cfg))

    want = grads(base)  # unscanned, no remat
    got = grads(base.replace(scan_layers=True, remat="full"))  # the training configuration
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert max(float(np.abs(v).max()) for v in want.values()) > 1e-3


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_qkv_proj", "save_out_proj"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_remat_policy_differentiates(remat, scan_layers):
    """Tracing only (cheap): each policy builds a checkpointed backward pass."""
    cfg = tiny_vision_config(remat=remat, scan_layers=scan_layers)
    model = _abstract(cfg)
    px = jnp.zeros((1, 3, 32, 32))
    jaxpr = jax.make_jaxpr(lambda m: nnx.grad(_loss(px))(m))(model)
    text = str(jaxpr)
    assert "checkpoint" in text or "remat" in text


def test_wrong_pixel_layout_is_refused():
    cfg = tiny_vision_config()
    enc = _abstract(cfg)
    fill_random(enc)
    with pytest.raises(ValueError, match="channels first"):
        enc(jnp.zeros((1, 32, 32, 3)))  # NHWC
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        enc(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="channels first"):
        enc(jnp.zeros((3, 32, 32)))  # a single image without the batch axis


def test_leading_axes_including_zero_images():
    enc = _abstract(tiny_vision_config())
    for lead in [(0,), (2, 0), (2, 3)]:
        px = jax.ShapeDtypeStruct(lead + (3, 32, 32), jnp.float32)
        assert jax.eval_shape(lambda m, x: m(x), enc, px).shape == lead + (16, 64)
        assert jax.eval_shape(lambda m, x: m.last_hidden_state(x), enc, px).shape == lead + (64, 32)


def test_unknown_remat_policy_is_refused():
    from t5gemma2_jax.ops.scan import remat_policy

    with pytest.raises(ValueError, match="unknown remat"):
        remat_policy("sometimes")

"""On 8 fake CPU devices: with FSDP-sharded tower weights the images stay split over the batch axes.

Without activation constraints GSPMD resolved the conflict between FSDP-sharded weights and
batch-sharded images by replicating the images: every device ran the whole image batch.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hf_vision_utils import tiny_vision_config
from t5gemma2_jax.parallel import MeshConfig
from t5gemma2_jax.parallel import make_mesh, sharding_rules
from t5gemma2_jax.sharding import axis_rules
from t5gemma2_jax.sharding import spec_for
from t5gemma2_jax.vision import VisionEncoder

N_IMAGES = 64


@pytest.fixture(scope="module")
def compiled():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = tiny_vision_config()
    mcfg = MeshConfig(data=2, fsdp=4, tensor=1)
    mesh, rules = make_mesh(mcfg), sharding_rules(mcfg)
    graphdef, state = nnx.split(VisionEncoder(cfg, rngs=nnx.Rngs(0)))

    def param_sharding(v: nnx.Variable) -> NamedSharding:
        spec, _ = spec_for(v.get_metadata()["logical_axes"], v.shape, mesh, rules)
        return NamedSharding(mesh, spec)

    shardings = jax.tree.map(param_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    v = cfg.vision
    pixels = np.random.default_rng(0).uniform(-1, 1, (N_IMAGES, 3, v.image_size, v.image_size)).astype(np.float32)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x),
                 in_shardings=(shardings, NamedSharding(mesh, P(("data", "fsdp")))))
    with jax.set_mesh(mesh), axis_rules(rules):
        program = fn.lower(state, pixels).compile()
        features = fn(state, pixels)
    return dict(cfg=cfg, mesh=mesh, state=state, shardings=shardings, graphdef=graphdef, pixels=pixels,
                program=program, features=features)


def test_tower_weights_are_fsdp_sharded(compiled):
    fc1 = compiled["shardings"]["tower"]["blocks"]["mlp"]["fc1_kernel"]
    assert fc1.spec[1] == "fsdp"  # [layers, vision_embed, vision_mlp]: the embed axis split


def test_images_stay_split_over_the_batch_axes(compiled):
    features, mesh = compiled["features"], compiled["mesh"]
    assert features.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), features.ndim)
    assert {s.data.shape[0] for s in features.addressable_shards} == {N_IMAGES // 8}
    # No device holds the MLP activation of the whole image batch (it did when images were replicated).
    v = compiled["cfg"].vision
    full_batch_mlp = N_IMAGES * v.patches_per_side ** 2 * v.intermediate_size * 4
    assert compiled["program"].memory_analysis().temp_size_in_bytes < full_batch_mlp


def test_sharded_features_equal_single_device(compiled):
    ref = nnx.merge(compiled["graphdef"], compiled["state"])(compiled["pixels"])
    np.testing.assert_allclose(np.asarray(compiled["features"]), np.asarray(ref), rtol=1e-5, atol=1e-5)

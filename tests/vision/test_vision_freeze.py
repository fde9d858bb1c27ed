"""Freezing the SigLIP tower: no optimizer state, no gradients, unchanged by a training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hf_vision_utils import fill_random, tiny_vision_config
from jaxprs import dot_equations
from t5gemma2_jax.vision import TRAINABLE, VISION_PARAMS, VisionEncoder


class _Wrapper(nnx.Module):
    """Stands in for the full model: the VisionEncoder sits at attribute `vision`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.vision = VisionEncoder(cfg, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden_size, 3, rngs=rngs)

    def __call__(self, px: jax.Array) -> jax.Array:
        return self.head(self.vision(px)).mean(axis=1)


def _model() -> _Wrapper:
    model = nnx.eval_shape(lambda: _Wrapper(tiny_vision_config(), rngs=nnx.Rngs(0)))
    fill_random(model, seed=0)
    return model


def _paths(state) -> list[tuple]:
    return [p for p, _ in state.flat_state()]


def _loss(model: _Wrapper, px: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(px) - y) ** 2)


def test_filters_split_the_model():
    model = _model()
    frozen = _paths(nnx.state(model, VISION_PARAMS))
    trainable = _paths(nnx.state(model, TRAINABLE))
    assert frozen and all(p[:2] == ("vision", "tower") for p in frozen)
    assert ("vision", "projector", "kernel") in trainable and ("head", "kernel") in trainable
    assert not any(p[:2] == ("vision", "tower") for p in trainable)
    assert len(frozen) + len(trainable) == len(_paths(nnx.state(model, nnx.Param)))


def test_optimizer_has_no_state_for_the_tower_and_step_leaves_it_unchanged():
    model = _model()
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=TRAINABLE)
    opt_paths = _paths(nnx.state(opt.opt_state))
    assert any("projector" in p for p in opt_paths) and any("head" in p for p in opt_paths)
    assert not any("tower" in p for p in opt_paths)
    n_opt = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.state(opt.opt_state).flat_state())
    n_train = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.state(model, TRAINABLE).flat_state())
    assert n_opt <= 2 * n_train + 8  # Adam's mu and nu for trainable params, plus counters

    before = {p: np.array(v.get_value()) for p, v in nnx.state(model, nnx.Param).flat_state()}
    rng = np.random.default_rng(0)
    px = jnp.asarray(rng.uniform(-1, 1, (2, 3, 32, 32)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)

    @nnx.jit
    def step(model, opt, px, y):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, TRAINABLE))(model, px, y)
        opt.update(model, grads)
        return loss, grads

    loss, grads = step(model, opt, px, y)
    assert np.isfinite(float(loss))
    assert not any("tower" in p for p in _paths(grads))
    after = {p: np.array(v.get_value()) for p, v in nnx.state(model, nnx.Param).flat_state()}
    for p in before:
        if p[:2] == ("vision", "tower"):
            np.testing.assert_array_equal(after[p], before[p], err_msg=str(p))
        else:
            assert not np.array_equal(after[p], before[p]), p  # every trainable param moved


def test_no_backward_pass_through_the_frozen_tower():
    model = _model()
    px, y = jnp.zeros((2, 3, 32, 32)), jnp.zeros((2, 3))

    def count(fn) -> int:
        graphdef, state = nnx.split(model)
        return len(dot_equations(jax.make_jaxpr(lambda s: fn(nnx.merge(graphdef, s)))(state).jaxpr))

    forward = count(lambda m: _loss(m, px, y))
    frozen = count(lambda m: nnx.grad(_loss, argnums=nnx.DiffState(0, TRAINABLE))(m, px, y))
    full = count(lambda m: nnx.grad(_loss)(m, px, y))
    # Frozen: the forward plus a few dots for the head's and projector's backward (weight grads,
    # the head's input grad); nothing inside the tower. Full: every tower dot (patch embedding +
    # 8 per block, counted once in the scan body) also gets backward dots.
    tower_dots = 1 + 8
    assert frozen - forward <= 4
    assert full - forward >= (frozen - forward) + tower_dots

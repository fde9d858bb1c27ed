"""Train-step pieces: the frozen vision tower's structure, schedules, the gradient of the mean
loss, the donated state updated in place, and the step's parts as separate programs."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from helpers import batch_for, small_config
from t5gemma2_jax.experiment import OptimConfig
from t5gemma2_jax.modeldef import ModelDef
from t5gemma2_jax.parallel import make_mesh, sharding_rules
from t5gemma2_jax.train import Trainer
from t5gemma2_jax.train.optim import make_optimizer, make_schedule
from t5gemma2_jax.train.state import abstract_state
from t5gemma2_jax.train.step import loss_and_grads, loss_sums


def test_frozen_vision_tower_gets_no_gradient_and_no_optimizer_state():
    """Structure only (nothing compiled); test_loop trains with images and checks the values."""
    cfg = small_config(images=True)
    mcfg = cfg.model_config()
    assert mcfg.with_vision
    model_def = ModelDef(mcfg, freeze_vision=True)
    assert model_def.frozen and all(n.startswith("vision.tower.") for n in model_def.frozen)
    assert any(n.startswith("vision.projector.") for n in model_def.trainable)
    tx, _ = make_optimizer(cfg.optim, 4)
    mesh, rules = make_mesh(cfg.mesh), sharding_rules(cfg.mesh)
    abstract, _ = abstract_state(model_def, tx, 0, mesh, rules)
    names = {getattr(k, "key", None) for path, _ in jax.tree_util.tree_flatten_with_path(abstract["opt_state"])[0]
             for k in path}
    assert not any(isinstance(n, str) and n.startswith("vision.tower.") for n in names)
    assert any(isinstance(n, str) and n.startswith("vision.projector.") for n in names)
    batch = batch_for(cfg)
    grads = jax.eval_shape(lambda p, f, b: loss_and_grads(model_def, p, f, b)[3],
                           model_def.shapes("trainable"), model_def.shapes("frozen"), batch)
    assert set(grads) == set(model_def.trainable)
    # Unfrozen: the tower is trainable like everything else.
    assert not ModelDef(mcfg, freeze_vision=False).frozen


@pytest.mark.parametrize("schedule", ["cosine", "linear", "rsqrt", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    o = OptimConfig(learning_rate=1.0, schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    f = make_schedule(o, 100)
    lr = np.array([float(f(s)) for s in (0, 5, 10, 50, 100)])
    assert lr[0] == 0 and lr[1] == pytest.approx(0.5) and lr[2] == pytest.approx(1.0)
    if schedule == "constant":
        assert lr[3] == lr[4] == pytest.approx(1.0)
    else:
        assert lr[2] > lr[3] > lr[4] > 0
    if schedule in ("cosine", "linear"):
        assert lr[4] == pytest.approx(0.1)
    if schedule == "rsqrt":
        assert lr[4] == pytest.approx(np.sqrt(10 / 100))


@pytest.fixture(scope="module")
def trainer():
    return Trainer.build(small_config())


def test_train_step_updates_the_donated_state_in_place(trainer):
    """Every state buffer is donated and aliased to its output, and the compiled step keeps no copy
    of the state (the non-finite guard decides before the update instead of selecting after it)."""
    steps = trainer.compile(with_eval=False)
    hlo = steps.train.as_text()
    leaves = jax.tree.leaves(trainer.abstract_state)
    assert hlo.splitlines()[0].count("may-alias") == len(leaves)
    assert not re.search(r"copy\(%state", hlo), "the compiled step copies part of the state"
    state = trainer.init_state()
    before = jax.tree.leaves(state)
    new, metrics = steps.train(state, trainer.place_batch(batch_for(trainer.cfg)))
    assert all(x.is_deleted() for x in before) and int(new["step"]) == 1 and int(metrics["nonfinite"]) == 0


@pytest.fixture(scope="module")
def mean_loss(trainer):
    """A state, a batch, and the loss and gradients of the mean of the summed token losses."""
    state, batch = trainer.init_state(), trainer.place_batch(batch_for(trainer.cfg))
    md = trainer.model_def

    def mean(params):
        total, (_, count) = loss_sums(md, params, state["frozen"], batch)
        return total / count

    return state, batch, *jax.jit(jax.value_and_grad(mean))(state["params"])


@pytest.mark.parametrize("microbatches", [1, 2])
def test_gradients_are_those_of_the_mean_loss(trainer, mean_loss, microbatches):
    """The loss is divided by the batch's weight before differentiation: the same gradients as
    differentiating the mean of the summed token losses."""
    state, batch, want_loss, want = mean_loss
    md = trainer.model_def
    loss, _, count, grads = jax.jit(lambda p: loss_and_grads(md, p, state["frozen"], batch,
                                                             microbatches=microbatches))(state["params"])
    assert float(count) == float(np.sum(batch["decoder_loss_weights"]))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=2e-4, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_compiled_parts_compose_to_the_train_step():
    """`compile_parts` (what benchmark.py --breakdown times): gradient then update is the step."""
    cfg = small_config()
    trainer = Trainer.build(cfg)
    batch = trainer.place_batch(batch_for(cfg))
    parts = trainer.compile_parts()
    state = trainer.init_state()
    loss, grads = parts.gradient(state, batch)
    np.testing.assert_allclose(float(parts.forward(state, batch)), float(loss), rtol=1e-5)
    old = jax.tree.leaves(state)
    by_parts = parts.update(state, grads, loss)
    assert all(x.is_deleted() for x in old)
    by_step, _ = trainer.compile(with_eval=False).train(trainer.init_state(), batch)
    for name in by_step["params"]:
        np.testing.assert_allclose(by_parts["params"][name], by_step["params"][name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)

"""The whole loop in-process, with images (frozen SigLIP), z-loss, evaluation, best-checkpoint
keeping, a SIGTERM mid-run and a resume bitwise equal to the uninterrupted run, a profiler trace,
metrics/TensorBoard files and the params-only export."""

from __future__ import annotations

import glob
import os
import signal
import struct

import jax
import numpy as np
import pytest
import yaml

from helpers import ActAt, small_config
from t5gemma2_jax.checkpoints.export import load_export_arrays
from t5gemma2_jax.experiment import from_dict
from t5gemma2_jax.modeldef import ModelDef
from t5gemma2_jax.parallel import make_mesh, sharding_rules
from t5gemma2_jax.train import load_export, read_metrics, train
from t5gemma2_jax.train.checkpoint import Checkpointer
from t5gemma2_jax.train.data import SyntheticBatches
from t5gemma2_jax.train.optim import make_optimizer
from t5gemma2_jax.train.state import abstract_state, init_state
from t5gemma2_jax.train.summary import RunSummary


def SigtermAt(*a, at: int, **kw):
    """Synthetic batches that send this process a SIGTERM while fetching batch `at` (1-based)."""
    return ActAt(*a, at=at, action=lambda: os.kill(os.getpid(), signal.SIGTERM), **kw)


def _tb_scalars(workdir):
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            e = event_pb2.Event()
            e.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in e.summary.value:
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


@pytest.mark.slow
def test_train_sigterm_resume_eval_export(tmp_path, tmp_path_factory):
    cfg = small_config(images=True, train={
        "steps": 6, "checkpoint_every": 2, "keep_checkpoints": 2, "eval_every": 3, "keep_best": True,
        "z_loss": 1e-3, "export_at_end": True, "tensorboard": True, "profile_steps": [1, 2]})
    model = cfg.model_config()
    evals = lambda: SyntheticBatches(cfg.data, model, split="eval", eval_batches=2)  # noqa: E731

    s1 = train(cfg, tmp_path, batches=SigtermAt(cfg.data, model, at=3), eval_batches=evals)
    assert s1.preempted and s1.step == 3 and s1.export is None
    assert Checkpointer(tmp_path / "checkpoints", every=2).latest_step() == 3
    assert len(glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))) == 1

    s2 = train(cfg, tmp_path, batches=SyntheticBatches(cfg.data, model), eval_batches=evals)
    assert s2.start_step == 3 and s2.step == 6 and not s2.preempted
    assert s2.data_stats == {"batches": 6}  # the data iterator resumed after batch 3

    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss_with_z"] > r["loss"] > 0 for r in train_rows)
    assert all(0 < r["mfu"] < 1 and r["tflops_per_device"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    steps = Checkpointer(tmp_path / "checkpoints", every=2).all_steps()
    assert 6 in steps and 4 in steps and len(steps) <= 3  # last 2 + the best by eval loss

    tb = _tb_scalars(tmp_path)
    assert [s for s, _ in tb["train/loss"]][-3:] == [4, 5, 6] and "eval/loss" in tb
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert from_dict(saved) == cfg

    # Stopped by SIGTERM at step 3 and resumed, the run is bit for bit the uninterrupted one.
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    ref = train(cfg, ref_dir, batches=SyntheticBatches(cfg.data, model), eval_batches=evals)
    losses = lambda rows: {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}  # noqa: E731
    assert losses(rows) == losses(read_metrics(ref_dir))
    shapes = {**ModelDef(model).shapes("trainable"), **ModelDef(model).shapes("frozen")}
    ref_params = jax.device_get(load_export_arrays(ref.export, shapes))
    got_params = jax.device_get(load_export_arrays(s2.export, shapes))
    for n in shapes:
        np.testing.assert_array_equal(got_params[n], ref_params[n], err_msg=n)

    # The frozen tower kept its initial values; the projector and text model trained.
    model_def = ModelDef(model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    mesh, rules = make_mesh(cfg.mesh), sharding_rules(cfg.mesh)
    _, sh = abstract_state(model_def, tx, 0, mesh, rules)
    init = jax.device_get(init_state(model_def, tx, 0, mesh, rules, sh))
    final = jax.device_get(load_export_arrays(s2.export, {**model_def.shapes("trainable"),
                                                             **model_def.shapes("frozen")}))
    for n in model_def.frozen:
        np.testing.assert_array_equal(final[n], init["frozen"][n])
    for n in ("vision.projector.kernel", "embedder.table", "decoder.stack.blocks.layers.0.mlp.up"):
        assert not np.array_equal(final[n], init["params"][n]), n

    # The export is a complete model that save_hf writes for transformers.
    from flax import nnx
    from t5gemma2_jax import save_hf

    loaded = load_export(s2.export)
    assert loaded.config == model
    table = nnx.state(loaded, nnx.Param)["embedder"]["table"].get_value()
    np.testing.assert_array_equal(np.asarray(table), final["embedder.table"])
    save_hf(loaded, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists() and glob.glob(str(tmp_path / "hf" / "*.safetensors"))

    # Fine-tuning starts from the export or from the Hugging Face directory: same parameters,
    # fresh optimizer state at step 0.
    from t5gemma2_jax.train.state import load_pretrained, state_from_params

    for source in (s2.export, tmp_path / "hf"):
        params, frozen = load_pretrained(str(source), model_def, sh)
        for n, v in {**params, **frozen}.items():
            np.testing.assert_array_equal(np.asarray(v), final[n], err_msg=f"{source}: {n}")
            assert v.sharding == {**sh["params"], **sh["frozen"]}[n]
    st = jax.device_get(state_from_params(model_def, tx, 0, params, frozen, mesh, sh))
    assert int(st["step"]) == 0 and not np.any(st["opt_state"][1][0].mu["embedder.table"])

    # Rerunning a finished work directory returns at once.
    again = train(cfg, tmp_path, batches=SyntheticBatches(cfg.data, model), eval_batches=evals)
    assert again == RunSummary(start_step=6, step=6) and again.wall_time_s is None and not again.preempted

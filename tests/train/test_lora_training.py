"""LoRA training: only the adapters get gradients and optimizer state, checkpoints hold the
adapters alone and refuse another base on resume, `train.init_from` takes a training checkpoint,
and a LoRA (and QLoRA) SFT run on the demo chat data lowers the loss."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import t5gemma2_jax as tg
from helpers import batch_for, small_config
from t5gemma2_jax.checkpoints.run import run_checkpoint
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.train import Trainer, read_metrics, train
from t5gemma2_jax.train.checkpoint import Checkpointer, state_bytes
from t5gemma2_jax.train.data import SyntheticBatches
from t5gemma2_jax.train.summary import RunSummary

ROOT = Path(__file__).resolve().parents[2]


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _full_run(workdir: Path, seed: int = 0, steps: int = 2) -> RunSummary:
    cfg = small_config(train={"steps": steps, "checkpoint_every": steps, "export_at_end": True, "seed": seed})
    return train(cfg, workdir, batches=SyntheticBatches(cfg.data, cfg.model_config()))


@pytest.mark.slow
def test_only_the_adapters_train(tmp_path):
    cfg = small_config(lora={"rank": 4, "alpha": 8})
    trainer = Trainer.build(cfg)
    state = trainer.init_state()
    assert all("_lora." in n for n in state["params"]) and len(state["params"]) == 2 * 7 * 4
    assert not any("_lora" in n for n in state["frozen"])
    # Optimizer moments exist for the adapters only.
    moments = jax.tree.leaves(state["opt_state"])
    assert sum(x.size for x in moments if x.ndim) == 2 * sum(x.size for x in jax.tree.leaves(state["params"]))
    before = jax.device_get(state)
    steps = trainer.compile()
    # B starts at zero, so A's gradient is zero until B has moved (and step 0 has lr 0: warm-up).
    for seed in range(4):
        state, metrics = steps.train(state, trainer.place_batch(batch_for(cfg, seed)))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = jax.device_get(state)
    for n, v in before["frozen"].items():
        np.testing.assert_array_equal(after["frozen"][n], v, err_msg=n)
    for n, v in before["params"].items():
        assert not np.array_equal(after["params"][n], v), f"adapter {n} did not train"


@pytest.mark.slow
def test_lora_checkpoints_hold_the_adapters_and_refuse_another_base(tmp_path):
    full = _full_run(tmp_path / "full")
    other = _full_run(tmp_path / "other", seed=1)
    # Started from the full run's training checkpoint (its work directory) ...
    cfg = small_config(lora={"rank": 4}, train={"steps": 2, "checkpoint_every": 2, "export_at_end": True,
                                                 "init_from": str(tmp_path / "full")})
    model = cfg.model_config()
    s1 = train(cfg, tmp_path / "lora", batches=SyntheticBatches(cfg.data, model))
    assert s1.step == 2 and Path(s1.adapter, "adapter_config.json").is_file() and s1.export is None

    # The checkpoint holds the adapters and their moments, not the frozen base: 9% of a full
    # state's bytes at rank 4 on this 64-wide model. On disk every stored parameter is an adapter;
    # the directory's size only orders the two, since Orbax's OCDBT index and manifest add 0.8 to
    # 1.8 MB to either (more data files when the writes batch differently, as under load).
    lora_trainer, full_trainer = Trainer.build(cfg), Trainer.build(small_config())
    ratio = (state_bytes(lora_trainer.checkpointed(lora_trainer.abstract_state))
             / state_bytes(full_trainer.checkpointed(full_trainer.abstract_state)))
    assert ratio < 0.1, ratio
    ckpt = tmp_path / "lora" / "checkpoints" / "2"
    stored = [k for k in json.loads((ckpt / "state" / "_METADATA").read_text())["tree_metadata"] if "." in k]
    assert stored and all("_lora." in k for k in stored), [k for k in stored if "_lora." not in k][:5]
    lora_disk, full_disk = _disk_bytes(ckpt / "state"), _disk_bytes(run_checkpoint(tmp_path / "full") / "state")
    assert lora_disk < full_disk, (lora_disk, full_disk)

    # ... resumes on the same base given as its export (the same arrays, bit for bit) ...
    cont = small_config(lora={"rank": 4}, train={"steps": 4, "checkpoint_every": 2, "export_at_end": True,
                                                  "init_from": full.export})
    s2 = train(cont, tmp_path / "lora", batches=SyntheticBatches(cfg.data, model))
    assert s2.start_step == 2 and s2.step == 4
    # ... and refuses another one, naming it.
    wrong = small_config(lora={"rank": 4}, train={"steps": 6, "checkpoint_every": 2, "init_from": other.export})
    with pytest.raises(CheckpointError, match=r"checkpoints/4: its adapters were trained on another base than "
                                              r".*other/export"):
        train(wrong, tmp_path / "lora", batches=SyntheticBatches(cfg.data, model))
    assert Checkpointer(tmp_path / "lora" / "checkpoints", every=2).latest_step() == 4   # nothing quarantined

    # The adapter directory the run wrote is what its last checkpoint holds.
    base = tg.load_export(full.export)
    adapted = tg.load_peft(base, s2.adapter)
    trainer = Trainer.build(cont)
    restored = Checkpointer(tmp_path / "lora" / "checkpoints", every=2).restore(
        4, trainer.checkpointed(trainer.abstract_state))
    arrays = tg.adapters.adapter_arrays(adapted)
    for name, value in restored.state["params"].items():
        site, part = name.rsplit("_lora.", 1)
        np.testing.assert_array_equal(arrays[f"{site}.{part}"], np.asarray(value), err_msg=name)

    # A LoRA run's checkpoint is not a model to start from.
    with pytest.raises(CheckpointError, match=r"a LoRA run's checkpoint holds adapters, not a model"):
        Trainer.build(small_config()).state_from_pretrained(str(tmp_path / "lora"))


@pytest.mark.slow
def test_init_from_a_training_checkpoint_equals_its_export(tmp_path):
    full = _full_run(tmp_path / "full")
    trainer = Trainer.build(small_config())
    a = jax.device_get(trainer.state_from_pretrained(str(tmp_path / "full" / "checkpoints" / "2")))
    b = jax.device_get(trainer.state_from_pretrained(full.export))
    for n in a["params"]:
        np.testing.assert_array_equal(a["params"][n], b["params"][n], err_msg=n)
    assert int(a["step"]) == 0
    with pytest.raises(tg.ConfigError, match="different architecture"):
        Trainer.build(small_config(model={"decoder": {"intermediate_size": 96}})).state_from_pretrained(
            str(tmp_path / "full"))


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", pytest.param("nf4", marks=pytest.mark.heavy)])
def test_a_lora_sft_run_on_the_chat_data_lowers_the_loss(tmp_path, quantize):
    from t5gemma2_jax.experiment import load_config

    cfg = load_config(ROOT / "configs" / "tiny_lora.yaml", [
        "model.encoder.num_layers=2", "model.decoder.num_layers=2",
        "model.encoder.layer_types=[sliding_attention,full_attention]",
        "model.decoder.layer_types=[sliding_attention,full_attention]",
        "train.steps=40", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=40",
        "train.progress_bar=false",
        f"lora.quantize_base={quantize}"])
    summary = train(cfg, tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 40 and summary.stopped_by is None
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


@pytest.mark.slow
def test_adapter_dropout_draws_from_the_step_key_in_training_only():
    from t5gemma2_jax.experiment import LoraConfig
    from t5gemma2_jax.modeldef import ModelDef
    from t5gemma2_jax.train.step import loss_sums

    cfg = small_config()
    model_def = ModelDef(cfg.model_config(), lora=LoraConfig(rank=4, dropout=0.5))
    assert model_def.stochastic and not ModelDef(cfg.model_config(), lora=LoraConfig(rank=4)).stochastic
    model = model_def.new_model(nnx.Rngs(0))
    for _, lora in tg.adapters.lora_sites(model):      # non-zero B: dropout on the adapter's input shows
        lora.b.set_value(jnp.full(lora.b.shape, 0.5))
    params, frozen = model_def.split(model)
    batch = {k: jnp.asarray(v) for k, v in batch_for(cfg).items()}
    loss = jax.jit(lambda key: loss_sums(model_def, params, frozen, batch, dropout_rng=key)[0])
    plain = float(jax.jit(lambda: loss_sums(model_def, params, frozen, batch)[0])())
    a, b = jax.random.key(1), jax.random.key(2)
    assert float(loss(a)) == float(loss(a)) != plain       # reproducible from the key ...
    assert float(loss(a)) != float(loss(b))                # ... and a new mask for another key


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", pytest.param("nf4", marks=pytest.mark.heavy)])
def test_the_frozen_base_and_the_adapters_shard_by_the_same_rules(quantize):
    """On 8 fake devices: the frozen base (quantised or not) is FSDP/tensor-sharded like a trained
    one, each adapter follows its kernel's input and output axes, and the adapters' gradients
    agree between a data-parallel mesh and an FSDP x tensor one."""
    from jax.sharding import PartitionSpec as P

    from t5gemma2_jax.sharding import axis_rules
    from t5gemma2_jax.train.step import loss_and_grads

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    grads = {}
    for mesh in ({"data": 8, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 2, "tensor": 4}):
        cfg = small_config(lora={"rank": 4, "quantize_base": quantize}, mesh=mesh)
        trainer = Trainer.build(cfg)
        sh = trainer.state_shardings
        if mesh["tensor"] == 4:
            up = "decoder.stack.blocks.layers.0.mlp.up"
            kernel = f"{up}.codes" if quantize == "nf4" else up
            # [layers, embed, mlp]: embed over fsdp, mlp over tensor (codes pack the mlp axis in two)
            assert sh["frozen"][kernel].spec == P(None, "fsdp", "tensor")
            assert sh["params"][f"{up}_lora.a"].spec == P(None, "fsdp", None)
            assert sh["params"][f"{up}_lora.b"].spec == P(None, None, "tensor")
        state = trainer.init_state()
        # Non-zero B everywhere, or A's gradient is zero and hides a layout bug.
        rng = np.random.default_rng(0)
        params = {n: (v + 0.1 * rng.normal(size=v.shape).astype(np.float32) if n.endswith(".b") else v)
                  for n, v in jax.device_get(state["params"]).items()}
        params = jax.device_put(params, sh["params"])
        batch = trainer.place_batch(batch_for(cfg))
        with jax.set_mesh(trainer.mesh), axis_rules(trainer.rules):
            loss, _, _, g = jax.jit(lambda p, f, b: loss_and_grads(trainer.model_def, p, f, b))(
                params, state["frozen"], batch)
        grads[mesh["tensor"]] = (float(loss), jax.device_get(g))
    (l1, g1), (l4, g4) = grads[1], grads[4]
    assert l1 == pytest.approx(l4, rel=1e-5)
    # Relative to the array's largest entry: sums run in another order per mesh (a layout bug is O(1)).
    for n in g1:
        scale = float(np.max(np.abs(g1[n])))
        assert scale > 0 and float(np.max(np.abs(g4[n] - g1[n]))) <= 1e-4 * scale, n

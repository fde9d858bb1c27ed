"""Sharded training of T5Gemma 2: config, mesh, state, step, FLOPs, checkpoints, metrics, loop.

    from t5gemma2_jax.train import load_config, train
    cfg = load_config("configs/tiny.yaml", ["train.steps=200"])
    summary = train(cfg, "/tmp/run")          # resumes automatically from /tmp/run/checkpoints

    trainer = Trainer.build(cfg)              # the same wiring without a loop (AOT, benchmarks)

Command line: `python scripts/train.py --config configs/tiny.yaml --workdir DIR [key=value ...]`.
"""

from t5gemma2_jax.checkpoints.export import load_export, save_export
from t5gemma2_jax.experiment import (ExperimentConfig, MeshConfig, ModelSpec, OptimConfig, TrainConfig,
                                       load_config)
from t5gemma2_jax.modeldef import ModelDef
from t5gemma2_jax.parallel import (SetupError, global_batch, make_mesh, maybe_initialize_distributed,
                                     sharding_rules)
from t5gemma2_jax.train.checkpoint import Checkpointer
from t5gemma2_jax.train.flops import StepFlops, compiled_flops, compiled_memory, peak_flops_per_device, step_flops
from t5gemma2_jax.train.loop import train
from t5gemma2_jax.train.metrics import read_metrics
from t5gemma2_jax.train.optim import make_optimizer
from t5gemma2_jax.train.reports import evaluate
from t5gemma2_jax.train.setup import prepare
from t5gemma2_jax.train.state import abstract_state, init_state
from t5gemma2_jax.train.step import CompiledSteps, loss_and_grads, make_eval_step, make_train_step
from t5gemma2_jax.train.trainer import Trainer

__all__ = [
    "Checkpointer", "CompiledSteps", "ExperimentConfig", "MeshConfig", "ModelDef", "ModelSpec",
    "OptimConfig", "SetupError", "StepFlops", "TrainConfig", "Trainer", "abstract_state", "compiled_flops",
    "compiled_memory", "evaluate", "global_batch", "init_state", "load_config", "load_export", "loss_and_grads",
    "make_eval_step", "make_mesh", "make_optimizer", "make_train_step", "maybe_initialize_distributed",
    "peak_flops_per_device", "prepare", "read_metrics", "save_export", "sharding_rules", "step_flops", "train",
]

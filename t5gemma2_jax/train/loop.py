"""The training loop: resume or initialise, then step / log / evaluate / checkpoint until done."""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from t5gemma2_jax.checkpoints.export import save_export
from t5gemma2_jax.train import flops as flops_lib
from t5gemma2_jax.train.checkpoint import Checkpointer
from t5gemma2_jax.train.config import ExperimentConfig
from t5gemma2_jax.train.data import make_batches
from t5gemma2_jax.train.metrics import MetricsWriter, Progress
from t5gemma2_jax.train.setup import PreemptionGuard, prepare, save_resolved_config
from t5gemma2_jax.train.step import CompiledSteps
from t5gemma2_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


def train(cfg: ExperimentConfig, workdir, *, batches=None, eval_batches=None, devices=None) -> dict:
    """Runs (or resumes) the experiment in `workdir`. `batches` / `eval_batches()` replace the
    configured data (an iterator with get_state/set_state, a function returning one)."""
    workdir, trainer = prepare(cfg, workdir, devices)
    t, mesh, pidx, pcount = cfg.train, trainer.mesh, jax.process_index(), jax.process_count()
    save_resolved_config(cfg, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", every=t.checkpoint_every, keep=t.keep_checkpoints,
                        keep_best=t.keep_best, async_save=t.async_checkpointing)
    data = batches if batches is not None else make_batches(cfg, trainer.model_config, "train", pidx, pcount)
    start = ckpt.latest_step() or 0
    if start:
        restored = ckpt.restore(start, trainer.abstract_state)
        state = restored.state
        if restored.data is not None:
            data.set_state(restored.data)
        else:
            log.warning("checkpoint %d has no data state for process %d of %d: data restarts", start, pidx, pcount)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    elif t.init_from:
        state = trainer.state_from_pretrained(t.init_from)
    else:
        state = trainer.init_state()
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=t.tensorboard, enabled=pidx == 0)
    summary = {"start_step": start, "step": start, "preempted": False}
    if start >= t.steps:
        writer.close(), ckpt.close()
        return summary

    tic = time.time()
    steps = trainer.compile()
    log.info("compiled the train step in %.1f s", time.time() - tic)
    d = cfg.data
    B, S, T = d.batch_size, d.encoder_length, d.decoder_length
    step_flops = trainer.step_flops().train_per_step
    peak, peak_src = flops_lib.peak_flops_per_device(mesh.devices.flat[0], t.peak_tflops)
    log.info("%.4g TFLOP per step (analytic); peak %.4g TFLOP/s per device (%s)", step_flops / 1e12, peak / 1e12, peak_src)
    meta = {"config": cfg.to_dict(), "mesh": dict(mesh.shape), "model_config": trainer.model_config.to_dict()}

    progress = Progress(t.steps, start, enabled=t.progress_bar and pidx == 0)
    pending, last_time, last_step, eval_metrics = [], time.time(), start, None
    with PreemptionGuard() as guard:
        for step in range(start + 1, t.steps + 1):
            state, m = steps.train(state, trainer.place_batch(next(data)))
            pending.append(m)
            is_log = step % t.log_every == 0 or step == t.steps or step == start + 1
            if is_log:
                rows = jax.device_get(pending)
                now = time.time()
                dt = (now - last_time) / (step - last_step)
                row = {k: float(v) for k, v in rows[-1].items()}
                row["loss_avg"] = float(np.mean([r["loss"] for r in rows]))
                row.update(step_time=dt, tokens_per_s=B * (S + T) / dt,
                           tflops_per_device=step_flops / dt / mesh.size / 1e12,
                           mfu=(step_flops / dt / mesh.size / peak) if peak else None)
                writer.write(step, row)
                progress.update(step - last_step, row)
                pending, last_time, last_step = [], now, step
            eval_metrics = None
            if t.eval_every and step % t.eval_every == 0:
                eval_metrics = evaluate(steps, state, trainer, eval_batches() if eval_batches
                                        else make_batches(cfg, trainer.model_config, "eval", pidx, pcount), t.eval_steps)
                writer.write(step, eval_metrics)
                progress.write(f"step {step}: eval_loss {eval_metrics['eval_loss']:.4f}")
            stop = guard.should_stop(ckpt, step, sync=is_log)
            if step % t.checkpoint_every == 0 or step == t.steps or stop or (eval_metrics and t.keep_best):
                ckpt.save(step, state, data.get_state(), {**meta, "step": step}, force=True,
                          metrics={"eval_loss": eval_metrics["eval_loss"]} if eval_metrics else None)
            summary["step"] = step
            if stop:
                summary["preempted"] = True
                break
    progress.close()
    ckpt.close()
    writer.close()
    if t.export_at_end and not summary["preempted"]:
        summary["export"] = str(save_export(workdir / "export", trainer.model_config,
                                            {**state["params"], **state["frozen"]}))
    summary["data_stats"] = data.stats()
    if hasattr(data, "close"):
        data.close()
    return summary


def evaluate(steps: CompiledSteps, state, trainer: Trainer, batches, max_batches: int) -> dict:
    """Mean eval cross-entropy over at most `max_batches` batches (weighted by token count)."""
    sums = []
    for i, b in enumerate(batches):
        if i >= max_batches:
            break
        sums.append(steps.eval(state, trainer.place_batch(b)))
    if hasattr(batches, "close"):
        batches.close()
    sums = jax.device_get(sums)
    loss = sum(float(s["loss_sum"]) for s in sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    return {"eval_loss": loss / max(tokens, 1.0), "eval_tokens": tokens, "eval_batches": len(sums)}

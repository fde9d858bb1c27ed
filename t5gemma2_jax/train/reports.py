"""What the training loop writes as it goes: metrics rows (speed, MFU, the data's counters),
the evaluations, the progress bar and the loss plot."""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from t5gemma2_jax.experiment import ExperimentConfig
from t5gemma2_jax.train import flops as flops_lib
from t5gemma2_jax.train.data import make_batches
from t5gemma2_jax.train.heldout import HeldOut
from t5gemma2_jax.train.metrics import MetricsWriter, Progress
from t5gemma2_jax.train.plots import save_loss_plot
from t5gemma2_jax.train.step import CompiledSteps
from t5gemma2_jax.train.summary import RunSummary
from t5gemma2_jax.train.tracking import WandbRun, git_state
from t5gemma2_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


class Reports:
    """What the loop writes as it goes (process 0 only): metrics rows every `train.log_every` steps
    with speed and MFU, the evaluations (loss every `train.eval_every`, generation every
    `train.eval_generate_every`), the progress bar, the loss plot, TensorBoard and W&B."""

    def __init__(self, cfg: ExperimentConfig, trainer: Trainer, workdir, eval_batches):
        self.cfg, self.trainer, self.workdir, self.eval_batches = cfg, trainer, workdir, eval_batches
        self.chief = jax.process_index() == 0
        self.git = git_state()   # the code this run (or this resumption of it) ran, in every checkpoint's metadata

    def compile(self, start: int) -> CompiledSteps:
        """Opens the writers (from step `start`) and compiles the steps."""
        cfg, t, trainer = self.cfg, self.cfg.train, self.trainer
        tracker = (WandbRun(t.wandb, self.workdir, {**cfg.to_dict(), "git": self.git})
                   if t.wandb.enabled and self.chief else None)
        self.writer = MetricsWriter(self.workdir, resume_step=start, tensorboard=t.tensorboard, enabled=self.chief,
                                    tracker=tracker)
        self.progress = Progress(t.steps, start, enabled=t.progress_bar and self.chief)
        self.held_out = HeldOut(cfg, trainer.model_config) if t.eval_generate_every else None
        self.pending, self.last_time, self.last_step = [], time.time(), start
        tic = time.time()
        steps = trainer.compile()
        log.info("compiled the train step in %.1f s", time.time() - tic)
        d = cfg.data
        self.tokens = d.batch_size * (d.encoder_length + d.decoder_length)
        self.step_flops = trainer.step_flops().train_per_step
        self.peak, src = flops_lib.peak_flops_per_device(trainer.mesh.devices.flat[0], t.peak_tflops)
        log.info("%.4g TFLOP per step (analytic); peak %.4g TFLOP/s per device (%s)", self.step_flops / 1e12,
                 self.peak / 1e12, src)
        return steps

    def step(self, step: int, m: dict, data, divergence, summary: RunSummary) -> bool:
        """Keeps the step's metrics; writes a row on logging steps (and says whether this was one)."""
        t = self.cfg.train
        self.pending.append(m)
        if not (step % t.log_every == 0 or step == t.steps or step == summary.start_step + 1):
            return False
        divergence.flush()
        now = time.time()
        dt = (now - self.last_time) / (step - self.last_step)
        row = _log_row(jax.device_get(self.pending), data.stats(), divergence.total, dt, self.tokens,
                       self.step_flops / dt / self.trainer.mesh.size, self.peak)
        self.writer.write(step, row)
        self.progress.update(step - self.last_step, row)
        self.pending, self.last_time, self.last_step = [], now, step
        summary.loss = row["loss"]
        return True

    def evaluate(self, step: int, steps: CompiledSteps, state, summary: RunSummary, at_start: bool = False):
        """The evaluations due at `step` (all of them `at_start`); the eval loss if it was measured."""
        cfg, t, trainer = self.cfg, self.cfg.train, self.trainer
        eval_loss = None
        if at_start or (t.eval_every and step % t.eval_every == 0):
            batches = (self.eval_batches() if self.eval_batches else
                       make_batches(cfg, trainer.model_config, "eval", jax.process_index(), jax.process_count()))
            metrics = evaluate(steps, state, trainer, batches, t.eval_steps)
            self.writer.write(step, metrics)
            save_loss_plot(self.workdir, enabled=self.chief)
            self.progress.write(f"step {step}: eval_loss {metrics['eval_loss']:.4f}")
            eval_loss = summary.eval_loss = metrics["eval_loss"]
        if self.held_out is not None and (at_start or step % t.eval_generate_every == 0):
            metrics, samples = self.held_out.evaluate(trainer.model_def.merge(state["params"], state["frozen"]))
            self.writer.write(step, {**metrics, "eval_samples": samples})
            self.writer.write_text(step, "eval_samples", samples)
            self.progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            summary.heldout = metrics
        return eval_loss

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        save_loss_plot(self.workdir, enabled=self.chief)


def _log_row(rows: list[dict], data_stats: dict, nonfinite_total: int, dt: float, tokens: int,
             flops_per_device_s: float, peak: float) -> dict:
    """One metrics.jsonl row: the last step's metrics, the window's mean loss, speed, the data's
    counters (records seen, examples, skips by reason) and the non-finite steps so far."""
    row = {k: float(v) for k, v in rows[-1].items() if k != "nonfinite"}
    row["loss_avg"] = float(np.mean([r["loss"] for r in rows]))
    row.update(step_time=dt, tokens_per_s=tokens / dt, tflops_per_device=flops_per_device_s / 1e12,
               mfu=(flops_per_device_s / peak) if peak else None, nonfinite_steps=nonfinite_total)
    row.update({k: v for k, v in data_stats.items() if isinstance(v, (int, float))})
    return row


def evaluate(steps: CompiledSteps, state, trainer: Trainer, batches, max_batches: int) -> dict:
    """Mean eval cross-entropy over at most `max_batches` batches (weighted by token count)."""
    sums = []
    try:
        for i, b in enumerate(batches):
            if i >= max_batches:
                break
            sums.append(steps.eval(state, trainer.place_batch(b)))
    finally:
        # Also when a step fails: an eval pipeline left open keeps its workers' batches in shared
        # memory until the interpreter's exit, which then reports them as leaked.
        if hasattr(batches, "close"):
            batches.close()
    sums = jax.device_get(sums)
    loss = sum(float(s["loss_sum"]) for s in sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    return {"eval_loss": loss / max(tokens, 1.0), "eval_tokens": tokens, "eval_batches": len(sums)}

"""The training loop: resume or initialise, then step / log / evaluate / checkpoint until done.

Faults end a run with its work intact: a step that is not finite is not applied (the train step
keeps the last good state) and `train.max_nonfinite_steps` of them in a row stop the run; a
checkpoint that does not restore is set aside for the one before it; SIGTERM, Ctrl-C and a
preemption notice checkpoint and stop, on every host at the same step (`train/preemption`);
whatever else goes wrong, the in-flight checkpoint is finished before the error leaves.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from t5gemma2_jax.adapters import save_peft
from t5gemma2_jax.checkpoints.export import save_export
from t5gemma2_jax.checkpoints.run import checksums
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.experiment import ExperimentConfig
from t5gemma2_jax.train import flops as flops_lib
from t5gemma2_jax.storage import StorageError
from t5gemma2_jax.train.checkpoint import Checkpointer
from t5gemma2_jax.train.data import make_batches
from t5gemma2_jax.train.heldout import HeldOut
from t5gemma2_jax.train.metrics import MetricsWriter, Progress
from t5gemma2_jax.train.plots import save_loss_plot
from t5gemma2_jax.train.preemption import PreemptionGuard
from t5gemma2_jax.train.profile import StepProfiler
from t5gemma2_jax.train.setup import prepare, save_resolved_config
from t5gemma2_jax.train.step import CompiledSteps
from t5gemma2_jax.train.tracking import WandbRun, git_state
from t5gemma2_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


class Divergence:
    """Counts the steps the train step refused (non-finite loss or gradient) and notices a step that
    was applied but left the parameters non-finite (their norm overflows float32, as a runaway
    learning rate makes it). Each step's flags are read one step late, so that the host never waits
    for the step it has just dispatched; `flush` reads them at once before a checkpoint.

    The train step decides from the loss and gradient before it writes the state in place (no copy
    of the state to fall back to), so a step whose result is broken cannot be undone: the run stops
    before that state is checkpointed or exported (`broken_at`)."""

    def __init__(self, limit: int, total: int = 0, start: int = 0):
        self.limit, self.total, self.in_a_row, self.last_good = limit, total, 0, start or None
        self.broken_at: int | None = None
        self._pending: tuple[int, jax.Array, jax.Array] | None = None

    def push(self, step: int, flag: jax.Array, param_norm: jax.Array) -> None:
        self.flush()
        self._pending = (step, flag, param_norm)

    def flush(self) -> None:
        if self._pending is not None:
            step, flag, param_norm = self._pending
            self._pending = None
            flag, param_norm = jax.device_get((flag, param_norm))
            bad = bool(flag)
            self.total += bad
            self.in_a_row = self.in_a_row + 1 if bad else 0
            if not bad and self.broken_at is None:
                if np.isfinite(param_norm):
                    self.last_good = step
                else:
                    self.broken_at = step

    @property
    def diverged(self) -> bool:
        return self.in_a_row >= self.limit or self.broken_at is not None

    def describe(self) -> str:
        if self.broken_at is not None:
            return (f"step {self.broken_at} left the parameters non-finite (their norm overflows float32) "
                    f"and cannot be undone; stopping before that state is saved, with the checkpoints as "
                    f"they are (last good step: {self.last_good})")
        return (f"{self.in_a_row} steps in a row had a non-finite loss or gradient and were not applied "
                f"(last applied: step {self.last_good}); stopping with the checkpoints as they are")


def train(cfg: ExperimentConfig, workdir, *, batches=None, eval_batches=None, devices=None) -> dict:
    """Runs (or resumes) the experiment in `workdir`. `batches` / `eval_batches()` replace the
    configured data (an iterator with get_state/set_state, a function returning one)."""
    started = time.time()
    workdir, trainer = prepare(cfg, workdir, devices)
    t, pidx, pcount = cfg.train, jax.process_index(), jax.process_count()
    save_resolved_config(cfg, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", every=t.checkpoint_every, keep=t.keep_checkpoints,
                        keep_best=t.keep_best, async_save=t.async_checkpointing,
                        write_gb=t.checkpoint_write_gb)
    data = batches if batches is not None else make_batches(cfg, trainer.model_config, "train", pidx, pcount)
    try:
        summary, state = _run(cfg, trainer, ckpt, data, eval_batches, workdir)
    except BaseException as e:
        # Finish (or fail) the in-flight save so the directory holds complete checkpoints only,
        # without letting a second error hide the one that stopped the run. Not when the store
        # has stopped answering: the save cannot land, and waiting would only add its retries.
        try:
            ckpt.close(wait=not isinstance(e, StorageError))
        except Exception as e:  # noqa: BLE001
            log.error("while stopping: %s", e)
        raise
    else:
        ckpt.close()
    finally:
        if hasattr(data, "close"):
            data.close()
    if state is None:                     # the work directory holds a finished run
        return summary
    if t.export_at_end and summary["stopped_by"] is None:
        if trainer.saves_base:
            summary["export"] = str(save_export(workdir / "export", trainer.model_config,
                                                {**state["params"], **state["frozen"]}))
        else:                                 # the adapters, for transformers + peft or `load_peft`
            model = trainer.model_def.merge(state["params"], state["frozen"])
            summary["adapter"] = str(save_peft(model, workdir / "adapter", base_model_name_or_path=t.init_from))
    summary.update(wall_time_s=time.time() - started, workdir=str(workdir), checkpoints=str(ckpt.directory),
                   last_checkpoint=ckpt.latest_step())
    return summary


def _restore(cfg: ExperimentConfig, trainer: Trainer, ckpt: Checkpointer, data):
    """(state, step, meta) of the newest checkpoint that restores, or a fresh / pretrained start."""
    t = cfg.train
    restored = ckpt.restore_latest(trainer.checkpointed(trainer.abstract_state))
    if restored is None:
        return trainer.fresh_state(), 0, {}
    if restored.data is not None:
        data.set_state(restored.data)
    elif t.allow_data_restart:
        log.warning("checkpoint %d has no data state for process %d: the data restarts "
                    "(train.allow_data_restart=true)", restored.step, jax.process_index())
    else:
        raise CheckpointError(f"{ckpt.directory}/{restored.step}: no data-iterator state for process "
                              f"{jax.process_index()} of {jax.process_count()}; resuming would restart the "
                              "data from its beginning (set train.allow_data_restart=true to accept that)")
    log.info("resumed from %s at step %d", ckpt.directory, restored.step)
    state = restored.state
    if not trainer.saves_base:               # the adapters' checkpoint: the base comes from its source
        frozen = trainer.fresh_state()["frozen"]
        if checksums(frozen) != restored.meta.get("base_checksums"):
            raise CheckpointError(f"{ckpt.directory}/{restored.step}: its adapters were trained on another base "
                                  f"than {t.init_from or f'the random init of train.seed={t.seed}'}; resume with the "
                                  "train.init_from (and lora.quantize_base) the run started with")
        state = {**state, "frozen": frozen}
    return state, restored.step, restored.meta


def _run(cfg, trainer: Trainer, ckpt: Checkpointer, data, eval_batches, workdir):
    """(summary, final state); the state is None when the run had already finished."""
    t, mesh, pidx, pcount = cfg.train, trainer.mesh, jax.process_index(), jax.process_count()
    state, start, meta_in = _restore(cfg, trainer, ckpt, data)
    if start >= t.steps:
        return {"start_step": start, "step": start, "preempted": False}, None
    summary = {"start_step": start, "step": start, "preempted": False, "stopped_by": None, "diverged": False}
    git = git_state()      # the code this run (or this resumption of it) ran, in every checkpoint's metadata
    tracker = WandbRun(t.wandb, workdir, {**cfg.to_dict(), "git": git}) if t.wandb.enabled and pidx == 0 else None
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=t.tensorboard, enabled=pidx == 0, tracker=tracker)
    tic = time.time()
    steps = trainer.compile()
    log.info("compiled the train step in %.1f s", time.time() - tic)
    d = cfg.data
    tokens = d.batch_size * (d.encoder_length + d.decoder_length)
    step_flops = trainer.step_flops().train_per_step
    peak, peak_src = flops_lib.peak_flops_per_device(mesh.devices.flat[0], t.peak_tflops)
    log.info("%.4g TFLOP per step (analytic); peak %.4g TFLOP/s per device (%s)", step_flops / 1e12, peak / 1e12, peak_src)
    meta = {"config": cfg.to_dict(), "mesh": dict(mesh.shape), "model_config": trainer.model_config.to_dict(),
            "git": git}
    if not trainer.saves_base:     # on resume, the ones `_restore` has just verified the base against
        meta["base_checksums"] = meta_in.get("base_checksums") or checksums(state["frozen"])
    divergence = Divergence(t.max_nonfinite_steps, meta_in.get("nonfinite_steps", 0), start)

    progress = Progress(t.steps, start, enabled=t.progress_bar and pidx == 0)
    held_out = HeldOut(cfg, trainer.model_config) if t.eval_generate_every else None

    def run_eval(step: int) -> dict:
        metrics = evaluate(steps, state, trainer, eval_batches() if eval_batches
                           else make_batches(cfg, trainer.model_config, "eval", pidx, pcount), t.eval_steps)
        writer.write(step, metrics)
        save_loss_plot(workdir, enabled=pidx == 0)
        progress.write(f"step {step}: eval_loss {metrics['eval_loss']:.4f}")
        summary["eval_loss"] = metrics["eval_loss"]
        return metrics

    def run_generation_eval(step: int) -> None:
        metrics, samples = held_out.evaluate(trainer.model_def.merge(state["params"], state["frozen"]))
        writer.write(step, {**metrics, "eval_samples": samples})
        writer.write_text(step, "eval_samples", samples)
        progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        summary.update(metrics)

    if start == 0 and t.evaluates_at_start:        # the starting point of a fine-tune, in metrics.jsonl
        run_eval(0)
        if held_out is not None:
            run_generation_eval(0)
    pending, last_time, last_step = [], time.time(), start
    with PreemptionGuard() as guard, StepProfiler(t.profile_steps, workdir, enabled=pidx == 0) as profiler:
        for step in range(start + 1, t.steps + 1):
            with profiler.trace(step):
                state, m = steps.train(state, trainer.place_batch(next(data)))
            profiler.after(step, m)
            divergence.push(step, m["nonfinite"], m["param_norm"])
            pending.append(m)
            is_log = step % t.log_every == 0 or step == t.steps or step == start + 1
            if is_log:
                divergence.flush()
                now = time.time()
                dt = (now - last_time) / (step - last_step)
                row = _log_row(jax.device_get(pending), data.stats(), divergence.total, dt, tokens,
                               step_flops / dt / mesh.size, peak)
                writer.write(step, row)
                progress.update(step - last_step, row)
                pending, last_time, last_step = [], now, step
                summary["loss"] = row["loss"]
            eval_metrics = None
            if t.eval_every and step % t.eval_every == 0:
                eval_metrics = run_eval(step)
            if t.eval_generate_every and step % t.eval_generate_every == 0:
                run_generation_eval(step)
            summary["step"] = step
            stop = guard.should_stop(step, sync=is_log)
            save = step % t.checkpoint_every == 0 or step == t.steps or stop or (eval_metrics and t.keep_best)
            if save:
                divergence.flush()        # the state about to be saved is known to be good
            if divergence.diverged:
                summary["diverged"] = True
                log.error("%s", divergence.describe())
                break
            if save:
                ckpt.save(step, trainer.checkpointed(state), data.get_state(),
                          {**meta, "step": step, "nonfinite_steps": divergence.total},
                          force=True, metrics={"eval_loss": eval_metrics["eval_loss"]} if eval_metrics else None)
            if stop:
                summary["preempted"], summary["stopped_by"] = True, guard.requested or "preemption"
                break
    divergence.flush()
    progress.close()
    writer.close()
    save_loss_plot(workdir, enabled=pidx == 0)
    summary.update(nonfinite_steps=divergence.total, last_applied_step=divergence.last_good,
                   broken_at_step=divergence.broken_at,
                   data_stats=data.stats())
    if hasattr(data, "skip_summary"):
        summary["skip_summary"] = data.skip_summary()
    if summary["diverged"]:
        summary["stopped_by"] = "divergence"
    return summary, state


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

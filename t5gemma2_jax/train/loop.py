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
from t5gemma2_jax.storage import StorageError
from t5gemma2_jax.train.checkpoint import Checkpointer
from t5gemma2_jax.train.data import make_batches
from t5gemma2_jax.train.preemption import PreemptionGuard
from t5gemma2_jax.train.profile import StepProfiler
from t5gemma2_jax.train.reports import Reports
from t5gemma2_jax.train.setup import prepare, save_resolved_config
from t5gemma2_jax.train.summary import RunSummary
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


def train(cfg: ExperimentConfig, workdir, *, batches=None, eval_batches=None, devices=None) -> RunSummary:
    """Runs (or resumes) the experiment in `workdir`. `batches` / `eval_batches()` replace the
    configured data (an iterator with get_state/set_state, a function returning one)."""
    started = time.time()
    workdir, trainer = prepare(cfg, workdir, devices)
    t = cfg.train
    save_resolved_config(cfg, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", every=t.checkpoint_every, keep=t.keep_checkpoints,
                        keep_best=t.keep_best, async_save=t.async_checkpointing,
                        write_gb=t.checkpoint_write_gb)
    data = batches if batches is not None else make_batches(cfg, trainer.model_config, "train",
                                                            jax.process_index(), jax.process_count())
    try:
        summary, state = _run(cfg, trainer, ckpt, data, Reports(cfg, trainer, workdir, eval_batches))
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
    if t.export_at_end and summary.stopped_by is None:
        if trainer.saves_base:
            summary.export = str(save_export(workdir / "export", trainer.model_config,
                                             {**state["params"], **state["frozen"]}))
        else:                                 # the adapters, for transformers + peft or `load_peft`
            model = trainer.model_def.merge(state["params"], state["frozen"])
            summary.adapter = str(save_peft(model, workdir / "adapter", base_model_name_or_path=t.init_from))
    summary.wall_time_s, summary.workdir = time.time() - started, str(workdir)
    summary.checkpoints, summary.last_checkpoint = str(ckpt.directory), ckpt.latest_step()
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


def _run(cfg: ExperimentConfig, trainer: Trainer, ckpt: Checkpointer, data, reports: Reports):
    """(summary, final state); the state is None when the run had already finished."""
    t = cfg.train
    state, start, meta_in = _restore(cfg, trainer, ckpt, data)
    summary = RunSummary(start_step=start, step=start)
    if start >= t.steps:
        return summary, None
    steps = reports.compile(start)
    meta = _checkpoint_meta(cfg, trainer, state, meta_in, reports.git)
    divergence = Divergence(t.max_nonfinite_steps, meta_in.get("nonfinite_steps", 0), start)
    if start == 0 and t.evaluates_at_start:        # the starting point of a fine-tune, in metrics.jsonl
        reports.evaluate(0, steps, state, summary, at_start=True)
    with PreemptionGuard() as guard, StepProfiler(t.profile_steps, reports.workdir, enabled=reports.chief) as profiler:
        for step in range(start + 1, t.steps + 1):
            with profiler.trace(step):
                state, m = steps.train(state, trainer.place_batch(next(data)))
            profiler.after(step, m)
            divergence.push(step, m["nonfinite"], m["param_norm"])
            logged = reports.step(step, m, data, divergence, summary)
            eval_loss = reports.evaluate(step, steps, state, summary)
            summary.step = step
            stop = guard.should_stop(step, sync=logged)
            save = step % t.checkpoint_every == 0 or step == t.steps or stop or (eval_loss is not None and t.keep_best)
            if save:
                divergence.flush()        # the state about to be saved is known to be good
            if divergence.diverged:
                log.error("%s", divergence.describe())
                summary.stopped_by = "divergence"
                break
            if save:
                ckpt.save(step, trainer.checkpointed(state), data.get_state(),
                          {**meta, "step": step, "nonfinite_steps": divergence.total}, force=True,
                          metrics=None if eval_loss is None else {"eval_loss": eval_loss})
            if stop:
                summary.stopped_by = guard.requested or "preemption"
                break
    divergence.flush()
    reports.close()
    summary.nonfinite_steps, summary.last_applied_step = divergence.total, divergence.last_good
    summary.broken_at_step, summary.data_stats = divergence.broken_at, data.stats()
    summary.skip_summary = data.skip_summary() if hasattr(data, "skip_summary") else None
    return summary, state


def _checkpoint_meta(cfg: ExperimentConfig, trainer: Trainer, state, meta_in: dict, git: dict) -> dict:
    """What every checkpoint of this run (or resumption) records beside its state."""
    meta = {"config": cfg.to_dict(), "mesh": dict(trainer.mesh.shape), "model_config": trainer.model_config.to_dict(),
            "git": git}
    if not trainer.saves_base:     # on resume, the ones `_restore` has just verified the base against
        meta["base_checksums"] = meta_in.get("base_checksums") or checksums(state["frozen"])
    return meta

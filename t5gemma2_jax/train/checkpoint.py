"""Orbax checkpoints of a training run's state, resumable onto any mesh.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items:
  state  the TrainState pytree (params, frozen params, optimizer state, step, RNG), sharded arrays
  data   each process' data-iterator state as JSON (`process_<i>-of-<n>.json`)
  meta   JSON: step, metrics, the resolved config, the mesh it was written on

Saves are asynchronous (the device->host copy happens in `save`, the writing in a background
thread). Orbax writes into a temporary directory and renames it when every item is complete,
and `latest_step()` only sees complete checkpoints, so a process killed mid-write leaves nothing
that a restart would resume from (the leftover temporary directory is removed on the next start).
Restoring reads every array straight into the shardings of the target mesh, which may differ from
the mesh it was written on.

The params export a run writes at its end (`WORKDIR/export`) is a checkpoint format of the model,
not of the run: `t5gemma2_jax.checkpoints.export`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Per-process JSON item (data iterator states differ per host).


class ProcessJsonHandler(ocp.CheckpointHandler):
    def save(self, directory: epath.Path, args: "ProcessJsonSave") -> None:
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.item))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore | None" = None) -> Any:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = epath.Path(directory) / name
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data: Any  # this process' data-iterator state, or None
    meta: dict


class Checkpointer:
    """`CheckpointManager` keeping the last `keep` checkpoints plus, optionally, the best one by
    `eval_loss` (lowest)."""

    def __init__(self, directory: str | Path, *, every: int, keep: int = 3, keep_best: bool = False,
                 async_save: bool = True):
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        self.directory = Path(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Any, meta: dict, *, metrics: dict | None = None,
             force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ProcessJsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        saved = self.manager.save(step, args=args, metrics=metrics, force=force)
        if saved:
            log.info("checkpoint %d: saving to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state) -> Restored:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ProcessJsonRestore(), meta=ocp.args.JsonRestore())
        r = self.manager.restore(step, args=args)
        return Restored(step=step, state=r.state, data=r.data, meta=dict(r.meta or {}))

    def reached_preemption(self, step: int) -> bool:
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no preemption service (single host, CPU)
            return False

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

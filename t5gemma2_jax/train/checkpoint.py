"""Orbax checkpoints of a training run's state, resumable onto any mesh, verified on restore.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items:
  state  the TrainState pytree (params, frozen params, optimizer state, step, RNG), sharded arrays
  data   each process' data-iterator state as JSON (`process_<i>-of-<n>.json`)
  meta   JSON: step, metrics, the resolved config, the mesh it was written on

Saves are asynchronous (the device->host copy happens in `save`, the writing in a background
thread). On a disk Orbax writes into a temporary directory and renames it when every item is
complete; in an object store (`gs://`) it writes into `<step>/` and puts `commit_success.txt`
there last. `latest_step()` only sees complete checkpoints, so a process killed mid-write leaves
nothing that a restart would resume from (the leftover is removed on the next start).
Restoring reads every array straight into the shardings of the target mesh, which may differ from
the mesh it was written on.

The params export a run writes at its end (`WORKDIR/export`) is a checkpoint format of the model,
not of the run: `t5gemma2_jax.checkpoints.export`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from t5gemma2_jax import storage
from t5gemma2_jax.checkpoints.run import SET_ASIDE_FILE, CheckpointIOError, checksums, is_set_aside, mismatched_checksums
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.storage import AnyPath

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


@dataclasses.dataclass(frozen=True)
class _WithoutSetAside(ocp.path.step.NameFormat):
    """Orbax's step naming, blind to the steps marked `set_aside.json` (an object store's way of
    setting a damaged checkpoint aside, where nothing can be renamed): Orbax lists, restores,
    keeps and garbage-collects only the others."""

    inner: Any

    def build_name(self, step: int) -> str:
        return self.inner.build_name(step)

    def find_all(self, base_path):
        return [m for m in self.inner.find_all(base_path) if not is_set_aside(epath.Path(m.path))]

    def find_step(self, base_path, step: int):
        found = self.inner.find_step(base_path, step)
        if is_set_aside(epath.Path(found.path)):
            raise ValueError(f"checkpoint {step} under {base_path} was set aside ({SET_ASIDE_FILE})")
        return found


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data: Any  # this process' data-iterator state, or None
    meta: dict


class CheckpointStoreError(CheckpointIOError, storage.StorageError):
    """A checkpoint could not be written to an object store (unreachable, refused)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint written by another configuration (model or optimizer): not damage,
    so it is reported, never set aside for an older one."""


def state_bytes(state) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


class Checkpointer:
    """`CheckpointManager` keeping the last `keep` checkpoints plus, optionally, the best one by
    `eval_loss` (lowest).

    Each save records per-array checksums of the state in its metadata and first checks that the
    directory takes a write and has room for it (`CheckpointIOError` in one line, at the save that
    would fail, instead of a stall inside Orbax or an error one save later). `restore_latest`
    verifies the checksums and falls back, checkpoint by checkpoint, to the newest one that
    restores; a checkpoint that does not is set aside, never deleted: on a disk moved to
    `<directory>.quarantine/`, in an object store marked with `set_aside.json` (moved out of
    the way only if the run comes to save that step again).

    In an object store the write probe and the free-space check are skipped (a bucket has no
    free space to measure), and a save cut off by the store going away is not waited for."""

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 3, keep_best: bool = False,
                 async_save: bool = True, write_gb: int = 2):
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            step_name_format=(_WithoutSetAside(ocp.path.step.standard_name_format())
                              if storage.is_url(directory) else None))
        self.directory = storage.as_path(directory)
        self.remote = storage.is_url(directory)
        self._unconfirmed: set[int] = set()      # steps saved since the last save known to have landed
        # Handlers named up front, so that a fresh manager can read a checkpoint's metadata (the
        # layout check) before anything was saved or restored through it.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            # Orbax's default lets 96 GB be written at once, so a save buffered the whole state
            # beside its own copy of it: a 270m-270m run (4.4 GB of state) peaked at 15.8 GB of
            # host memory during an asynchronous save, 13.7 GB with 2 GB in flight.
            "state": ocp.StandardCheckpointHandler(save_concurrent_gb=write_gb), "data": ProcessJsonHandler(),
            "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Any, meta: dict, *, metrics: dict | None = None,
             force: bool = False) -> bool:
        try:
            # The free space is only known once the previous asynchronous save has landed (Orbax
            # waits for it before starting this one anyway, so nothing overlaps less).
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the earlier save's failure
            raise self._write_failed(e) from None
        self._unconfirmed.clear()
        if not (force or self.manager.should_save(step)):
            return False
        if self.remote:
            self._clear_set_aside(step)
        else:
            self._check_writable(step, self._needed_bytes(state_bytes(state)))
        meta = {**meta, "checksums": checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ProcessJsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        self._unconfirmed.add(step)
        try:
            saved = self.manager.save(step, args=args, metrics=metrics, force=force)
        except Exception as e:  # noqa: BLE001 - incl. an earlier asynchronous save's failure
            raise self._write_failed(e) from None
        if saved:
            log.info("checkpoint %d: saving to %s", step, self.directory)
        return saved

    def _write_failed(self, e: Exception) -> CheckpointIOError:
        """One line for a failed write (Orbax and tensorstore raise long multi-line errors). In a
        store the steps are not listed again: the store may be what failed, and each request to
        it would retry for half a minute."""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
        if self.remote:
            complete = sorted(set(self.manager.all_steps()) - self._unconfirmed)
            where = f"{storage.bucket(self.directory)}: writing a checkpoint to {self.directory}"
        else:
            self.manager.reload()   # forget steps that never completed
            complete, where = self.all_steps(), f"writing a checkpoint to {self.directory}"
        error = CheckpointStoreError if self.remote else CheckpointIOError
        return error(f"{where} failed ({type(e).__name__}: {first}); complete checkpoints: {complete}")

    def _needed_bytes(self, state_nbytes: int) -> int:
        """Room a save needs: the latest checkpoint's size on disk when there is one (it includes
        Orbax's metadata and layout), else the state's bytes; plus a margin."""
        latest = self.latest_step()
        on_disk = 0
        if latest is not None:
            on_disk = sum(os.path.getsize(p) for p in storage.files_under(self.directory / str(latest)))
        return int(max(on_disk, state_nbytes) * 1.1) + 2**20

    def _check_writable(self, step: int, nbytes: int) -> None:
        """A small write, and room for the whole state, before Orbax starts (process 0 checks:
        the directory is shared by every host)."""
        if jax.process_index() != 0:
            return
        probe = self.directory / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
            free = shutil.disk_usage(self.directory).free
        except OSError as e:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
            raise CheckpointIOError(f"checkpoint {step}: cannot write to {self.directory}: "
                                    f"{e.strerror or e}; complete checkpoints: {self.all_steps()}") from None
        if free < nbytes:
            raise CheckpointIOError(f"checkpoint {step}: {self.directory} has {free / 2**20:.1f} MiB free, the "
                                    f"checkpoint needs {nbytes / 2**20:.1f} MiB; complete checkpoints: "
                                    f"{self.all_steps()}")

    def restore(self, step: int, abstract_state, *, verify: bool = True) -> Restored:
        """Checkpoint `step` onto the shardings of `abstract_state`; raises if it does not restore
        or its arrays do not match the checksums it was saved with, and `CheckpointMismatch` if
        it holds other arrays than `abstract_state` describes."""
        self._check_layout(step, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        r = self.manager.restore(step, args=args)
        meta = dict(r.meta or {})
        if verify and "checksums" in meta:
            bad = mismatched_checksums(r.state, meta["checksums"])
            if bad:
                raise ValueError(f"{len(bad)} arrays differ from their checksums (e.g. {bad[0]})")
        try:
            data = self.manager.restore(step, args=ocp.args.Composite(data=ProcessJsonRestore())).data
        except (FileNotFoundError, KeyError, ValueError):
            data = None
        return Restored(step=step, state=r.state, data=data, meta=meta)

    def _check_layout(self, step: int, abstract_state) -> None:
        tree = self.manager.item_metadata(step)["state"]
        stored = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(getattr(tree, "tree", tree))}
        wanted = {".".join(map(str, k)): tuple(v.shape) for k, v in ocp.tree.to_flat_dict(abstract_state).items()}
        if stored != wanted:
            diff = sorted(f"{k}: checkpoint {stored.get(k)} != config {wanted.get(k)}"
                          for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise CheckpointMismatch(f"{self.directory}/{step}: the checkpoint was written for another model or "
                                     f"optimizer configuration ({len(diff)} arrays differ, e.g. {'; '.join(diff[:3])}); "
                                     "use the configuration it was trained with, or start a new work directory")

    def restore_latest(self, abstract_state) -> Restored | None:
        """The newest checkpoint that restores and verifies (None when there is none at all);
        raises CheckpointError naming the directory when every one fails."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                return self.restore(step, abstract_state)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of one checkpoint: try the one before
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                log.error("checkpoint %d in %s does not restore (%s: %s); %s and trying the one before",
                          step, self.directory, type(e).__name__, reason, self._aside_where(step))
                self._quarantine(step, f"{type(e).__name__}: {reason}")
        if steps:
            raise CheckpointError(f"{self.directory}: none of the checkpoints {sorted(steps)} restores "
                                  f"({self._aside_where('<step>')}); remove the directory to start afresh")
        return None

    @property
    def quarantine(self) -> AnyPath:
        return self.directory.with_name(self.directory.name + ".quarantine")

    def _aside_where(self, step) -> str:
        if self.remote:
            return f"marking it {self.directory}/{step}/{SET_ASIDE_FILE}"
        return f"moving it to {self.quarantine}"

    def _quarantine(self, step: int, reason: str = "") -> None:
        if jax.process_index() == 0:
            if self.remote:
                # Nothing is renamed in an object store: a marker the readers honour sets it aside.
                storage.write_text(self.directory / str(step) / SET_ASIDE_FILE,
                                   json.dumps({"step": step, "reason": reason}) + "\n")
            else:
                self.quarantine.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.directory / str(step)), str(self._free_quarantine_name(step)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()

    def _free_quarantine_name(self, step: int) -> AnyPath:
        target, n = self.quarantine / str(step), 1
        while target.exists():
            target, n = self.quarantine / f"{step}.{n}", n + 1
        return target

    def _clear_set_aside(self, step: int) -> None:
        """A step set aside in a store blocks saving that step again (Orbax writes into `<step>/`
        in place): its objects are moved to `<directory>.quarantine/` first."""
        old = self.directory / str(step)
        if jax.process_index() == 0 and is_set_aside(old):
            target = self._free_quarantine_name(step)
            log.warning("checkpoint %d is saved again: moving the one set aside to %s", step, target)
            storage.move_tree(old, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"clear set-aside checkpoint {step}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self, *, wait: bool = True) -> None:
        """Finishes the in-flight save; raises CheckpointIOError if it (or an earlier one) failed.
        `wait=False` leaves it unfinished (the store it writes to has stopped answering); a
        step whose save did not finish is never resumed from."""
        if not wait:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failed(e) from None
        finally:
            self.manager.close()

"""A training run's checkpoint, read: where a path's newest complete step is, its metadata, and its
model parameters (`load_run_params`) without the optimizer state, verified against the checksums
the run saved.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items (written by `train.checkpoint`):
  state  the TrainState pytree (params, frozen params, optimizer state, step, RNG), sharded arrays
  data   each process' data-iterator state as JSON (`process_<i>-of-<n>.json`)
  meta   JSON: step, metrics, checksums, the resolved config, the mesh it was written on

The checksums are computed where each array lives (`checksums`), so verifying a restored state
moves no parameter to a host.

A step is complete when Orbax says so: on a disk it renames `<step>.orbax-checkpoint-tmp-*` to
`<step>` when every item is written (a digits-only name), in an object store it writes straight
into `<step>/` and puts `commit_success.txt` there last. A step that did not restore is set aside:
moved to `checkpoints.quarantine/` on a disk, marked with `set_aside.json` in a store (nothing is
renamed there); readers skip it either way.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from t5gemma2_jax import storage
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.storage import AnyPath

COMMIT_FILE = "commit_success.txt"      # Orbax's marker of a complete step in an object store
SET_ASIDE_FILE = "set_aside.json"       # a step that did not restore, in an object store


class CheckpointIOError(OSError):
    """A checkpoint could not be written (read-only or full directory, I/O error)."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words, elementwise (no reshape, so a sharded array stays put)."""
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    u = x if x.dtype == bits else jax.lax.bitcast_convert_type(x, bits)
    return u.astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    """[sum of words, sum of words x (flat index + 1)] mod 2**32: any changed word changes the
    first; a word moved, or two changes that cancel, the second.

    Both sums are one variadic reduction, so XLA computes the words and their indices inside it
    and reads `x` once: as two `jnp.sum`s the words were materialised for the second one (a copy
    of the array, and on CPU an order of magnitude slower; docs/benchmarks_archive.md)."""
    w = _words(x)
    index = jnp.ones(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    total, weighted = jax.lax.reduce((w, w * index), (jnp.uint32(0), jnp.uint32(0)),
                                     lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(x.ndim)))
    return jnp.stack([total, weighted])


_fingerprints = jax.jit(lambda flat: {k: _fingerprint(x) for k, x in flat.items()})


def _flat(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sums(flat: dict[str, jax.Array]) -> dict[str, list[int]]:
    return {k: [int(v) for v in value] for k, value in jax.device_get(_fingerprints(flat)).items()}


def checksums(state) -> dict[str, list]:
    """Per-array `[sum, weighted sum, dtype]` of a (sharded) state, computed where it lives."""
    flat = _flat(state)
    return {k: sums + [flat[k].dtype.name] for k, sums in _sums(flat).items()}


def mismatched_checksums(state, saved: dict[str, list]) -> list[str]:
    """Arrays of a restored `state` whose bits differ from what was saved. An array restored in a
    wider dtype than it was saved in is compared after casting back (exact); one restored
    narrower cannot be compared and is skipped."""
    comparable = {}
    for key, x in _flat(state).items():
        entry = saved.get(key)
        if entry is None:
            continue
        dtype = np.dtype(entry[2]) if len(entry) > 2 else x.dtype
        if x.dtype == dtype:
            comparable[key] = x
        elif np.can_cast(dtype, x.dtype, casting="safe"):
            comparable[key] = x.astype(dtype)
    return sorted(k for k, sums in _sums(comparable).items() if sums != saved[k][:2])


def is_set_aside(step_dir: AnyPath) -> bool:
    return storage.is_url(step_dir) and (step_dir / SET_ASIDE_FILE).exists()


def is_complete(step_dir: AnyPath) -> bool:
    """Whether a step directory (a digits-only name) holds a whole checkpoint that was not set aside.
    On a disk its name says so (Orbax renames a step when it is complete); in a store its
    commit marker."""
    if not storage.is_url(step_dir):
        return True
    return (step_dir / COMMIT_FILE).exists() and not (step_dir / SET_ASIDE_FILE).exists()


def run_checkpoint(path: str | os.PathLike) -> AnyPath | None:
    """The step directory of a training checkpoint that `path` names: a step directory itself, or
    the newest complete checkpoint of a checkpoints directory or of a work directory; else None.
    A step directory named directly must be complete too (CheckpointError otherwise)."""
    p = storage.as_path(path)
    with storage.storage_op("listing", p):
        if (p / "state").is_dir() and (p / "meta").is_dir():
            if not is_complete(p):
                raise CheckpointError(f"{p}: an incomplete checkpoint (no {COMMIT_FILE}: its save was cut off) or "
                                      f"one set aside as damaged ({SET_ASIDE_FILE})")
            return p
        if (p / "checkpoints").is_dir():
            p = p / "checkpoints"
        if not p.is_dir():
            return None
        steps = [int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "state").is_dir()]
        for step in sorted(steps, reverse=True):
            if is_complete(p / str(step)):
                return p / str(step)
    return None


def read_run_meta(step_dir: AnyPath) -> dict:
    try:
        return json.loads((step_dir / "meta" / "metadata").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir}: unreadable checkpoint metadata ({e})") from None


def load_run_params(step_dir: AnyPath, shapes: dict[str, jax.ShapeDtypeStruct], shardings: dict[str, Any] | None = None,
                    *, adapters: bool = False) -> dict[str, jax.Array]:
    """The model parameters named in `shapes` from training checkpoint `step_dir` (its `params`
    and `frozen` groups, whichever holds each), placed with `shardings` (default: the first local
    device) and verified against the checksums the run saved; the optimizer state stays on disk.
    A LoRA run's checkpoint holds only adapters: read them with `adapters=True`."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = {n: dev for n in shapes}
    meta = read_run_meta(step_dir)
    if "base_checksums" in meta and not adapters:
        raise CheckpointError(f"{step_dir}: a LoRA run's checkpoint holds adapters, not a model; its model is "
                              f"its base ({meta.get('config', {}).get('train', {}).get('init_from')}) with the run's "
                              "adapter directory (WORKDIR/adapter: generate.py --adapter, or load_peft + merge_lora)")
    path = storage.absolute(step_dir) / "state"
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path)
        tree = getattr(tree, "item_metadata", tree)
        tree = dict(getattr(tree, "tree", tree))
        where = {n: group for group in ("params", "frozen") for n in dict(tree.get(group) or {})}
        missing = sorted(set(shapes) - set(where))
        if missing:
            raise CheckpointError(f"{step_dir}: the checkpoint lacks {len(missing)} parameters of the model "
                                  f"(e.g. {missing[:3]})")
        wrong = [f"{n}: checkpoint {tuple(tree[where[n]][n].shape)} != model {tuple(s.shape)}"
                 for n, s in shapes.items() if tuple(getattr(tree[where[n]][n], "shape", s.shape)) != tuple(s.shape)]
        if wrong:
            raise CheckpointError(f"{step_dir}: {len(wrong)} parameters differ in shape (e.g. {'; '.join(wrong[:3])})")
        item: dict[str, dict] = {}
        for n, s in shapes.items():
            item.setdefault(where[n], {})[n] = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[n])
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    bad = mismatched_checksums(restored, meta.get("checksums", {}))
    if bad:
        raise CheckpointError(f"{step_dir}: {len(bad)} arrays differ from their checksums (e.g. {bad[0]})")
    return {n: restored[where[n]][n] for n in shapes}

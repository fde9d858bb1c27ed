"""Device mesh, sharding rules, multi-host start-up and global batches.

The mesh always has the axes `('data', 'fsdp', 'context', 'tensor')` (size 1 when unused), so the same
rules and the same code run on 1 CPU device, 8 fake CPU devices, a GPU and a TPU pod. Axes are
the classic `Auto` kind (GSPMD propagates shardings; `constrain()` in the model pins activations).
The batch dimension is sharded over `('data', 'fsdp')`; the devices of one `context` group hold the
same rows and split their encoder sequence (`sharding.length_of`, `ops/backends/context`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from t5gemma2_jax.configlib import require as _require
from t5gemma2_jax.hardware import tpu_evidence
from t5gemma2_jax.sharding import DEFAULT_RULES, Rules

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh `(data, fsdp, context, tensor)`; one size may be -1 (the devices left over).

    data: pure data parallelism (parameters replicated); fsdp: data parallelism with parameters
    and optimizer state sharded (ZeRO-3); context: each row's encoder sequence split over that many
    devices (their parameters and optimizer state sharded with fsdp's); tensor: heads / MLP / vocab
    sharding. `dcn_data` > 1
    spreads the data axis over that many slices (TPU multislice / GPU nodes) with the other axes
    inside a slice. `rules` overrides entries of `t5gemma2_jax.sharding.DEFAULT_RULES`
    (`{logical axis: mesh axis | [mesh axes] | null}`).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1  # devices one row's encoder sequence is split over (context parallelism)
    dcn_data: int = 1
    rules: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "context": self.context, "tensor": self.tensor}
        for name, v in sizes.items():
            _require(v == -1 or v >= 1, f"mesh.{name}", f"must be a positive integer or -1, got {v}")
        _require(sum(v == -1 for v in sizes.values()) <= 1, "mesh",
                 f"at most one axis may be -1, got {sizes}")
        _require(self.dcn_data >= 1, "mesh.dcn_data", f"must be >= 1, got {self.dcn_data}")
        if self.dcn_data > 1 and self.data != -1:
            _require(self.data % self.dcn_data == 0, "mesh.dcn_data",
                     f"{self.dcn_data} must divide mesh.data={self.data}")
        known = {k for k, _ in DEFAULT_RULES}
        for k, v in dict(self.rules).items():
            _require(k in known, f"mesh.rules.{k}", f"unknown logical axis; known: {sorted(known)}")
            vals = [v] if v is None or isinstance(v, str) else list(v)
            for a in vals:
                _require(a is None or a in ("data", "fsdp", "context", "tensor"), f"mesh.rules.{k}",
                         f"{a!r} is not a mesh axis (data, fsdp, context, tensor)")


class SetupError(RuntimeError):
    """The environment does not fit the config (devices, hosts, work directory)."""


TPU_CLUSTER_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "1") or 1)
    except ValueError:
        return 1


def distributed_signal(env: Mapping[str, str] | None = None, root: str | os.PathLike = "/",
                       platforms: str | None = None) -> str | None:
    """What makes `train.distributed=auto` call `jax.distributed.initialize()`, or None (one
    process). The first that holds decides:

    1. a TPU, unless `platforms` (`jax_platforms`) leaves it out: on GKE / xpk the variables
       TPU_WORKER_HOSTNAMES, TPU_PROCESS_ADDRESSES or MEGASCALE_COORDINATOR_ADDRESS; on a Cloud TPU
       VM the device tree (`hardware.tpu_evidence`). Always, as MaxText does: a pod slice started
       with `gcloud compute tpus tpu-vm ssh --worker=all` has nothing in its environment, JAX
       finds the workers from the TPU metadata server; on one host it makes a 1-process cluster,
       which JAX's preemption notifier and Orbax's multi-host saves need anyway;
    2. JAX_COORDINATOR_ADDRESS (a coordinator named by hand or by a launcher), or
       JAX_NUM_PROCESSES > 1;
    3. a Slurm job step with several tasks (SLURM_NTASKS > 1: started with `srun`);
    4. an Open MPI job with several ranks (OMPI_COMM_WORLD_SIZE > 1: `mpirun`).
    """
    env = os.environ if env is None else env
    platforms = jax.config.jax_platforms if platforms is None else platforms
    if not platforms or "tpu" in platforms.split(","):
        for name in TPU_CLUSTER_VARS:
            if env.get(name):
                return f"TPU cluster variable {name}"
        evidence = tpu_evidence(root)
        if evidence:
            return f"TPU: {evidence}"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if _count(env, "JAX_NUM_PROCESSES") > 1:
        return "JAX_NUM_PROCESSES > 1"
    if _count(env, "SLURM_NTASKS") > 1:
        return "Slurm job (SLURM_NTASKS > 1)"
    if _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI job (OMPI_COMM_WORLD_SIZE > 1)"
    return None


def maybe_initialize_distributed(mode: str = "auto", *, root: str | os.PathLike = "/") -> str | None:
    """`jax.distributed.initialize()` when `mode` is 'on', or 'auto' and `distributed_signal`
    names a reason; that reason if it was called, else None. Must run before JAX touches any device.

    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are passed on when set; otherwise
    JAX's own cluster detection fills them in (TPU metadata, GKE, Slurm, Open MPI). On a host with a
    TPU but no TPU cluster around it (a Colab runtime), 'auto' warns and carries on as one process."""
    if mode == "off":
        return None
    env = os.environ
    reason = distributed_signal(env, root) if mode == "auto" else "train.distributed=on"
    if reason is None:
        return None
    try:  # multi-process CPU (tests, CPU clusters) needs a collectives library; harmless elsewhere
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    kw = {}
    if env.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(env["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(**kw)
    except ValueError as e:
        # JAX's cluster detection found no cluster (it raises before connecting to anything).
        if mode == "auto" and reason.startswith("TPU: ") and not kw and not env.get("JAX_COORDINATOR_ADDRESS"):
            log.warning("%s, but JAX found no TPU cluster around it (%s): running as one process without "
                        "jax.distributed (no preemption sync point)", reason, e)
            return None
        raise SetupError(f"train.distributed={mode} ({reason}): jax.distributed.initialize() found no "
                         f"cluster: {e}; set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, "
                         "or train.distributed=off") from None
    return reason


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
    """(data, fsdp, context, tensor) with a -1 resolved; raises SetupError if it cannot cover the devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.context, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    desc = (f"mesh.data={cfg.data} x mesh.fsdp={cfg.fsdp} x mesh.context={cfg.context} "
            f"x mesh.tensor={cfg.tensor}")
    if -1 in sizes:
        if num_devices % known:
            raise SetupError(f"{desc}: the fixed axes ({known}) do not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise SetupError(f"{desc} = {known} devices, but there are {num_devices} devices "
                         f"({jax.devices()[0].platform}); the product must equal the device count "
                         "(or set one axis to -1)")
    if cfg.dcn_data > 1 and sizes[0] % cfg.dcn_data:
        raise SetupError(f"mesh.dcn_data={cfg.dcn_data} does not divide the data axis {sizes[0]}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    auto = (AxisType.Auto,) * len(AXES)
    if cfg.dcn_data > 1:
        from jax.experimental import mesh_utils

        ici = (shape[0] // cfg.dcn_data,) + tuple(shape[1:])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (cfg.dcn_data, 1, 1, 1), devices=devices)
        return Mesh(arr, AXES, axis_types=auto)
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except NotImplementedError as e:
        # A TPU torus maps each mesh axis onto whole physical axes (4x4x4: sizes 4, 16, 64); an
        # axis of 8 there needs a physical axis split in two, which costs neighbouring chips one
        # more hop but is what e.g. 8 rows of 8 context chips on v5p-128 require.
        from jax.experimental import mesh_utils

        log.warning("mesh %s does not map onto whole physical axes (%s); splitting physical axes",
                    dict(zip(AXES, shape)), e)
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(arr, AXES, axis_types=auto)


def sharding_rules(cfg: MeshConfig) -> Rules:
    """DEFAULT_RULES with the entries of `mesh.rules` replaced. With `mesh.context` > 1 the
    parameters' `embed` axis is sharded over `('fsdp', 'context')` unless `mesh.rules` says
    otherwise: a context group holds one copy of its rows, not of the model."""
    over: Mapping = dict(cfg.rules)
    if cfg.context > 1 and "embed" not in over:
        over["embed"] = ("fsdp", "context")
    rules = []
    for name, axes in DEFAULT_RULES:
        if name in over:
            v = over[name]
            axes = v if v is None or isinstance(v, str) else tuple(v)
        rules.append((name, axes))
    return tuple(rules)


def batch_spec(ndim: int) -> P:
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def check_batch(global_batch: int, mesh: Mesh, microbatches: int = 1, process_count: int = 1,
                name: str = "data.batch_size") -> None:
    """The global batch must split evenly over hosts and over the batch axes of every microbatch;
    `name` is the setting the messages tell the user to change."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % process_count:
        raise SetupError(f"{name}={global_batch} is not divisible by the {process_count} "
                         "processes (hosts)")
    if global_batch % (shards * microbatches):
        raise SetupError(
            f"{name}={global_batch} is not divisible by mesh.data x mesh.fsdp = {shards}"
            + (f" x train.microbatches={microbatches}" if microbatches > 1 else "")
            + f" (mesh {dict(mesh.shape)}): every batch shard needs the same number of rows")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process' rows -> global arrays sharded over the batch axes (multi-host safe)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def context_traffic(model, encoder_length: int, rows_per_chip: float, mesh_cfg: MeshConfig,
                    dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes one chip receives over the `context` axis in one forward pass (`model` a
    `T5Gemma2Config`, `rows_per_chip` rows per context group): each local encoder layer's halo
    (`left + right` keys and values, with their segment ids and positions), each global encoder
    layer's gather of the other chips' keys and values, and the decoder's one gather of the
    encoder output. The backward pass moves the same again (the collectives'
    transposes); full remat repeats the forward's. Zero without context parallelism."""
    from t5gemma2_jax.config import SLIDING
    from t5gemma2_jax.ops.masks import bidirectional_window

    c = mesh_cfg.context
    out = {"local_halo": 0.0, "global_gather": 0.0, "decoder_gather": 0.0}
    if c <= 1:
        return out

    def kv_bytes(tower):                      # keys + values of one position on one chip
        K = tower.num_kv_heads
        K = K // mesh_cfg.tensor if mesh_cfg.tensor > 1 and K % mesh_cfg.tensor == 0 else K
        return 2 * K * tower.head_dim * dtype_bytes
    enc = model.encoder
    others = encoder_length * (c - 1) / c           # positions held by the other chips
    for t in enc.layer_types:
        if t == SLIDING:
            halo = sum(bidirectional_window(enc.sliding_window))
            out["local_halo"] += rows_per_chip * halo * (kv_bytes(enc) + 8)
        else:
            out["global_gather"] += rows_per_chip * others * (kv_bytes(enc) + 8)
    # The decoder gathers the encoder's output once and projects every layer's keys from it.
    out["decoder_gather"] = rows_per_chip * others * enc.hidden_size * dtype_bytes
    return out

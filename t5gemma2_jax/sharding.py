"""Logical axis names -> mesh axes.

Parameters carry `logical_axes` metadata (e.g. `('embed', 'heads', 'head_dim')`); activations are
pinned with `constrain(x, ('activation_batch', 'activation_length', 'activation_embed'))`. One
table of rules maps both to mesh axes, so a new parallelism layout is a new table, not new code.
Outside a mesh (`jax.set_mesh`) `constrain` is a no-op, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# data: pure data parallel; fsdp: data parallel with parameters/optimizer sharded (ZeRO-3);
# context: one row's encoder sequence split across devices (context parallelism);
# tensor: Megatron-style heads/MLP/vocab sharding.
DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_head_dim", None),
    ("vision_patch", None),
    ("vision_position", None),
    ("lora_rank", None),        # adapters: sharded like their kernel's input / output axes
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    # Each tower's sequence: what `length_of("encoder_length")` / `length_of("decoder_length")`
    # map `activation_length` to inside the encoder / decoder (context parallelism).
    ("activation_encoder_length", "context"),
    ("activation_decoder_length", "context"),
    ("activation_encoder_keys", None),       # a decoder layer's keys of the (gathered) encoder output
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("t5gemma2_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: Rules):
    """Use `rules` for `constrain` and `logical_to_spec` inside the block."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    return _RULES.get()


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None,
                    mesh_axis_names: Iterable[str] | None = None) -> P:
    """PartitionSpec for logical `names`. Mesh axes absent from the mesh, or already used by an
    earlier dimension, are dropped (a mesh axis can shard only one dimension)."""
    table = dict(current_rules() if rules is None else rules)
    available = None if mesh_axis_names is None else set(mesh_axis_names)
    used: set[str] = set()
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        kept = tuple(a for a in axes if (available is None or a in available) and a not in used)
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    return P(*out)


@contextlib.contextmanager
def length_of(name: str):
    """Inside the block, `activation_length` follows the rule of `activation_{name}`: the encoder
    runs under `length_of("encoder_length")`, so every `constrain(x, ("batch", "length", ...))` of
    its layers splits the sequence over the mesh axis that rule names (`context`), and the layers'
    code stays the same for both towers."""
    table = dict(current_rules())
    target = table.get(f"activation_{name}")
    rules = tuple((k, target if k == "activation_length" else v) for k, v in table.items())
    with axis_rules(rules):
        yield


def sequence_axis() -> tuple[str, int] | None:
    """(mesh axis, size) the current `activation_length` rule splits sequences over on the active
    mesh, when that is one axis of size > 1; None otherwise (the sequence is whole on each device)."""
    mesh = _active_mesh()
    if mesh is None:
        return None
    axes = dict(current_rules()).get("activation_length")
    if isinstance(axes, (tuple, list)):
        axes = axes[0] if len(axes) == 1 else None
    if axes is None or axes not in mesh.axis_names:
        return None
    size = dict(zip(mesh.axis_names, mesh.axis_sizes))[axes]
    return (axes, size) if size > 1 else None


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def fit_spec(spec: P, shape: Sequence[int], axis_sizes: Mapping[str, int]) -> tuple[P, bool]:
    """`spec` for an array of `shape`, one entry per dimension, with every dimension its mesh axes
    do not divide sharded over the longest leading run of them that does (1152 over
    `('fsdp', 'context')` = 16 x 16: over `fsdp` alone), or left replicated when none does (one KV
    head on tensor=4): GSPMD would otherwise pad it and rematerialise. Also says whether any
    dimension fell back."""
    fitted, fell_back = [], False
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None:
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            keep = len(names)
            while keep and dim % math.prod(axis_sizes[a] for a in names[:keep]):
                keep -= 1
            if keep < len(names):
                fell_back = True
                axes = None if keep == 0 else (names[0] if keep == 1 else names[:keep])
        fitted.append(axes)
    return P(*fitted), fell_back


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh,
             rules: Rules | None = None) -> tuple[P, bool]:
    """PartitionSpec of an array with `logical_axes` on `mesh` (see `fit_spec` for the flag)."""
    spec = logical_to_spec(logical_axes, rules, mesh_axis_names=mesh.axis_names)
    return fit_spec(spec, shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))


def variable_spec(var, mesh, rules: Rules | None = None) -> tuple[P, bool]:
    """`spec_for` of an `nnx.Variable` from its `logical_axes` metadata (replicated without)."""
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    return spec_for(axes, var.shape, mesh, rules)


def param_shardings(variables: Mapping[str, Any], mesh, rules: Rules | None = None
                    ) -> tuple[dict[str, NamedSharding], list[str]]:
    """Each named `nnx.Variable`'s `NamedSharding` on `mesh` from its logical axes (`variable_spec`):
    the one derivation of parameter shardings for the train state, exports, loading and evaluation.
    Also the names that keep a dimension replicated because its mesh axes do not divide it."""
    out, fell_back = {}, []
    for name, var in variables.items():
        spec, fb = variable_spec(var, mesh, rules)
        out[name] = NamedSharding(mesh, spec)
        if fb:
            fell_back.append(name)
    return out, fell_back


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the sharding its logical `names` map to (no-op without a mesh)."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    names = tuple(n if n is None or n.startswith("activation_") else f"activation_{n}" for n in names)
    spec, _ = spec_for(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)

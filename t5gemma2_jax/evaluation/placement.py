"""A loaded model on a mesh: parameters sharded by their logical axes (the training rules), and
one compiled function of (model state, batch) per shape."""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from t5gemma2_jax.parallel import MeshConfig, make_mesh, sharding_rules
from t5gemma2_jax.sharding import Rules, axis_rules, variable_spec


def default_mesh(cfg: MeshConfig | None = None) -> tuple[Mesh, Rules]:
    """Every device, batch over `fsdp` with parameters sharded along it (the trainer's default)."""
    cfg = cfg or MeshConfig()
    return make_mesh(cfg), sharding_rules(cfg)


def place(model, mesh: Mesh, rules: Rules):
    """(graphdef, state) of `model` with each variable placed by its logical axes on `mesh`."""
    graphdef, state = nnx.split(model)
    placed = []
    for path, var in nnx.to_flat_state(state):
        sharding = NamedSharding(mesh, variable_spec(var, mesh, rules)[0])
        placed.append((path, var.replace(jax.device_put(var.get_value(), sharding))))
    return graphdef, nnx.from_flat_state(placed)


@functools.lru_cache(maxsize=8)
def compiled(graphdef, fn, mesh: Mesh, rules: Rules):
    """`jax.jit` of `fn(model, *args)` over (state, *args), traced under the mesh and rules (jit
    caches one program per argument shape)."""

    @jax.jit
    def run(state, *args):
        with axis_rules(rules):
            return fn(nnx.merge(graphdef, state), *args)

    def call(state, *args):
        with jax.set_mesh(mesh), axis_rules(rules):
            return run(state, *args)

    return call

"""A loaded model on a mesh: parameters sharded by their logical axes (the training rules), and
one compiled function of (model state, batch) per shape."""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh

from t5gemma2_jax.parallel import MeshConfig, make_mesh, sharding_rules
from t5gemma2_jax.sharding import Rules, axis_rules, param_shardings


def default_mesh(cfg: MeshConfig | None = None) -> tuple[Mesh, Rules]:
    """Every device, batch over `fsdp` with parameters sharded along it (the trainer's default)."""
    cfg = cfg or MeshConfig()
    return make_mesh(cfg), sharding_rules(cfg)


def place(model, mesh: Mesh, rules: Rules):
    """(graphdef, state) of `model` with each variable placed by its logical axes on `mesh`."""
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    shardings, _ = param_shardings(dict(enumerate(var for _, var in flat)), mesh, rules)
    placed = [(path, var.replace(jax.device_put(var.get_value(), shardings[i]))) for i, (path, var) in enumerate(flat)]
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

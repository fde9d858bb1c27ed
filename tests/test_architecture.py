"""The package's layering (docs/architecture.md), checked on its import graph: no module imports
from a layer above its own, and no two modules import each other, directly or round a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "t5gemma2_jax"
ROOT = "t5gemma2_jax"

# One layer per top-level module or package, none for a sub-module: a package's files share its
# layer. Keep in step with the table in docs/architecture.md.
LAYERS = {
    "t5gemma2_jax.configlib": 0, "t5gemma2_jax.figures": 0, "t5gemma2_jax.sharding": 0, "t5gemma2_jax.losses": 0, "t5gemma2_jax.ops": 0,
    "t5gemma2_jax.hardware": 0,
    "t5gemma2_jax.storage": 0,
    "t5gemma2_jax.config": 1, "t5gemma2_jax.data": 1, "t5gemma2_jax.parallel": 1,
    "t5gemma2_jax.nn": 2, "t5gemma2_jax.vision": 2,
    "t5gemma2_jax.model": 3,
    "t5gemma2_jax.checkpoints": 4, "t5gemma2_jax.generation": 4, "t5gemma2_jax.adapters": 4,
    "t5gemma2_jax.experiment": 5, "t5gemma2_jax.modeldef": 5, "t5gemma2_jax.loading": 5, "t5gemma2_jax.cli": 5,
    "t5gemma2_jax.evaluation": 6, "t5gemma2_jax.averaging": 6,
    "t5gemma2_jax.train": 7,
    "t5gemma2_jax": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = (ROOT,) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no layer in LAYERS")


def imports(module: str) -> set[str]:
    """Package modules `module` imports anywhere in its body (function-level imports too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n == ROOT or n.startswith(ROOT + "."))
    found.discard(module)
    found = {n if n in MODULES else n.rsplit(".", 1)[0] for n in found}
    # Importing `pkg.sub.mod` runs `pkg/sub/__init__.py` first: from outside a sub-package that is
    # an import of it too (the package root, which imports the public names, is left out).
    parents = set()
    for n in found:
        parts = n.split(".")
        for k in range(2, len(parts)):
            pkg = ".".join(parts[:k])
            if pkg in MODULES and not module.startswith(pkg + "."):
                parents.add(pkg)
    return (found | parents) - {module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)
    assert all(k == ROOT or k.count(".") == 1 for k in LAYERS), "a sub-module with a layer of its own"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                  for m, targets in graph.items() for t in targets if layer(t) > layer(m))


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_module_imports_from_a_layer_above_it():
    assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_no_import_cycles():
    assert not import_cycles(GRAPH), "\n".join(import_cycles(GRAPH))


def test_the_checks_see_violations():
    # The graph holds function-level imports, `from package import module` edges and the
    # package files an import from outside runs ...
    assert "t5gemma2_jax.checkpoints" in GRAPH["t5gemma2_jax.adapters"]
    assert not GRAPH["t5gemma2_jax.nn"]
    assert "t5gemma2_jax.ops.backends" in GRAPH["t5gemma2_jax.nn.attention"]
    assert "t5gemma2_jax.ops.backends.blockwise" in GRAPH["t5gemma2_jax.ops.backends.cudnn"]
    assert "t5gemma2_jax.vision" in GRAPH["t5gemma2_jax.model"]
    # ... and both rules bite on a graph that breaks them.
    bad = {**GRAPH, "t5gemma2_jax.model": GRAPH["t5gemma2_jax.model"] | {"t5gemma2_jax.train.loop"}}
    assert upward_imports(bad) == ["t5gemma2_jax.model (layer 3) imports t5gemma2_jax.train.loop (layer 7)"]
    loop = {"t5gemma2_jax.ops.masks": {"t5gemma2_jax.ops.backends"}, "t5gemma2_jax.ops.backends": {"t5gemma2_jax.ops.masks"}}
    assert import_cycles(loop) == ["t5gemma2_jax.ops.backends -> t5gemma2_jax.ops.masks -> t5gemma2_jax.ops.backends"]


def test_no_script_wires_the_trainer():
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    for script in scripts.glob("*.py"):
        text = script.read_text()
        for wiring in ("make_optimizer", "abstract_state", "CompiledSteps", "ModelDef", "optax."):
            assert wiring not in text, f"{script.name} builds {wiring} itself; use train.Trainer"

"""Calling a model with concrete arrays runs a cached `jax.jit` of the call's functional form.

`compile_on_first_use(fn)` makes `fn(model, *arrays, **kwargs)` split the model (`nnx.split`) and
run one program per model structure and static keyword arguments, each holding one executable per
input shape; while tracing (inside `jax.jit`, `nnx.jit`, `jax.grad`, the train step) `fn` runs as
it is. `model.T5Gemma2`'s calls, `encode`, `decode` and `generation.score` use it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from flax import nnx

from t5gemma2_jax.ops.rng import current_dropout_key, dropout_key
from t5gemma2_jax.sharding import current_rules

F = TypeVar("F", bound=Callable)
# Compiled programs kept, one per (function, model structure, static arguments); each holds one
# executable per input shape.
_PROGRAMS = 64


def _as_array(x):
    """Nested lists of ids become arrays, so that jit sees one argument, not a tree of scalars."""
    return np.asarray(x) if isinstance(x, (list, tuple)) else x


def _is_static(x) -> bool:
    return isinstance(x, (bool, int, float, str))


def traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=_PROGRAMS)
def _program(fn: Callable, graphdef, static: tuple, rules) -> Callable:
    # `rules` is part of the key because `constrain` reads them while tracing, from outside jit's view.
    del rules

    @jax.jit
    def run(state, args, kwargs, key):
        with dropout_key(key):
            return fn(nnx.merge(graphdef, state), *args, **kwargs, **dict(static))

    return run


def compile_on_first_use(fn: F | None = None, *, check: Callable[[Any, dict], None] | None = None) -> F:
    """`fn(model, *arrays, **kwargs)` through a cached `jax.jit` of its functional form.

    A call with concrete arrays splits the model (`nnx.split`) and runs the program compiled for
    its structure, its static keyword arguments (Python bools, numbers, strings) and the shapes of
    its arrays; the parameters are an argument, so new values reuse the program. A call that sees
    a tracer (in the arguments, the model's state or the dropout key, i.e. inside a transformation)
    runs `fn` as it is. `check(model, bound arguments)` runs before a compiled call, for checks
    that need the arguments' values (inside the program they are unknown).
    """
    if fn is None:
        return functools.partial(compile_on_first_use, check=check)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        args = tuple(_as_array(a) for a in args)
        kwargs = {k: _as_array(v) for k, v in kwargs.items()}
        key = current_dropout_key()
        graphdef, state = nnx.split(model)
        arrays = {k: v for k, v in kwargs.items() if not _is_static(v)}
        if traced((state, args, arrays, key)):
            return fn(model, *args, **kwargs)
        if check is not None:
            check(model, signature.bind(model, *args, **kwargs).arguments)
        static = tuple(sorted((k, v) for k, v in kwargs.items() if _is_static(v)))
        return _program(fn, graphdef, static, current_rules())(state, args, arrays, key)

    return call

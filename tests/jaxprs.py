"""Reading traced programs in tests."""

from __future__ import annotations


def dot_equations(jaxpr) -> list:
    """The dot_general equations of `jaxpr` and of the jaxprs nested in it (scan, cond, remat,
    pjit, custom VJPs)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += dot_equations(inner)
    return out

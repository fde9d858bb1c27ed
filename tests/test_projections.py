"""The projections' CPU forms equal the einsums they replace, values and gradients: the 2-D
`token_matmul` of every projection, the flattened tied LM head, and GeGLU's own backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprs import dot_equations
from t5gemma2_jax.nn.cpu_matmul import _split_equation, flattens_tokens, token_matmul
from t5gemma2_jax.nn.embed import Embedder
from t5gemma2_jax.nn.mlp import geglu


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


@pytest.mark.parametrize("equation, x_shape, w_shape", [
    ("BTD,DF->BTF", (2, 5, 8), (8, 12)),
    ("BSD,DKd->BSKd", (2, 5, 8), (8, 2, 4)),
    ("BTHd,HdD->BTD", (2, 5, 3, 4), (3, 4, 8)),
    ("NTD,DHK->NTHK", (3, 4, 8), (8, 2, 4)),
])
def test_token_matmul_equals_the_einsum_with_its_gradients(equation, x_shape, w_shape):
    assert flattens_tokens()                         # CPU, no sequence split: the 2-D form runs
    x, w = _normal(0, x_shape), _normal(1, w_shape)
    ct = _normal(2, jnp.einsum(equation, x, w).shape)
    f = lambda fn: jax.jit(lambda x, w: jnp.sum(fn(equation, x, w) * ct))  # noqa: E731
    np.testing.assert_allclose(token_matmul(equation, x, w), jnp.einsum(equation, x, w), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(f(token_matmul), (0, 1))(x, w), jax.grad(f(jnp.einsum), (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # ... and it is one 2-D dot, nothing transposed around it.
    dots = dot_equations(jax.make_jaxpr(lambda x, w: token_matmul(equation, x, w))(x, w).jaxpr)
    assert len(dots) == 1 and all(v.aval.ndim == 2 for v in dots[0].invars)
    # The backward's two dots are 2-D too.
    dots = dot_equations(jax.make_jaxpr(jax.grad(f(token_matmul), (0, 1)))(x, w).jaxpr)
    assert len(dots) == 3 and all(v.aval.ndim == 2 for d in dots for v in d.invars)


def test_equations_that_are_not_lead_in_out_stay_einsums():
    assert _split_equation("BTD,VD->BTV") is None             # contracts the kernel's last axis
    assert _split_equation("BKGTS,BSKd->BTKGd") is None       # batched over B and K
    x, w = _normal(0, (6, 8)), _normal(1, (8, 4))
    np.testing.assert_allclose(token_matmul("TD,DF->TF", x, w), x @ w, rtol=1e-6)   # one leading axis


def test_flattened_lm_head_equals_the_einsum_with_its_gradients():
    emb = Embedder(64, 8, eoi_token_id=3, param_dtype=jnp.float32, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(emb)
    x, ct = _normal(1, (2, 5, 8)), _normal(2, (2, 5, 64))

    def loss(state, x, flat):
        m = nnx.merge(graphdef, state)
        logits = m.decode(x) if flat else jnp.einsum("BTD,VD->BTV", x, m.table[...])
        return jnp.sum(logits * ct)

    got, want = jax.grad(loss, (0, 1))(state, x, True), jax.grad(loss, (0, 1))(state, x, False)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_geglu_backward_equals_autodiff_of_the_tanh_gelu(dtype):
    gate, up = _normal(0, (4, 64), 3.0).astype(dtype), _normal(1, (4, 64)).astype(dtype)
    ct = _normal(2, (4, 64)).astype(dtype)
    plain = lambda g, u: jnp.sum((jax.nn.gelu(g, approximate=True) * u * ct).astype(jnp.float32))  # noqa: E731
    ours = lambda g, u: jnp.sum((geglu(g, u) * ct).astype(jnp.float32))  # noqa: E731
    np.testing.assert_array_equal(geglu(gate, up), jax.nn.gelu(gate, approximate=True) * up)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for got, want in zip(jax.grad(ours, (0, 1))(gate, up), jax.grad(plain, (0, 1))(gate, up)):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)

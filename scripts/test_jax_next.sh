#!/usr/bin/env bash
# The default test tier under the newer JAX that GPU images ship (jax/jaxlib 0.11.2 with the flax,
# optax and orbax-checkpoint releases pip pairs with it), in a scratch venv beside .venv's pinned
# jax 0.10.2. Not part of CI: `make test-jax-next` runs it by hand before a GPU run or a pin move.
#
#   bash scripts/test_jax_next.sh [PYTEST ARGS...]     # e.g. -x, or tests/test_model.py
#
# JAX_NEXT (default 0.11.2) picks the release; VENV (default /tmp/t5gemma2-jax-next) the venv, made
# once and reused. JAX 0.11 needs Python >= 3.12: PYTHON312 (default python3.12) makes the venv.
# The test extra comes as pinned (torch 2.13.0, transformers 5.23.0, peft); for Python 3.12 pip
# takes torch from PyPI, whose Linux wheel brings the CUDA libraries (several GB, unused on CPU).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
JAX_NEXT=${JAX_NEXT:-0.11.2}
VENV=${VENV:-/tmp/t5gemma2-jax-next}
PYTHON312=${PYTHON312:-python3.12}

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON312" >/dev/null || {
        echo "error: test_jax_next.sh: $PYTHON312 not found (jax $JAX_NEXT needs Python >= 3.12; set PYTHON312)" >&2; exit 2; }
    "$PYTHON312" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "jax==$JAX_NEXT" "jaxlib==$JAX_NEXT" -e ".[test]"
"$VENV/bin/python" -m pip freeze >"$VENV/freeze.txt"
grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|grain|numpy|torch|transformers)==' "$VENV/freeze.txt" | tr '\n' ' '
echo
PYTHONPATH="$ROOT" exec "$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "${@:-tests}"

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))   # shared helpers (hf_reference.py, ...) for all test folders

import xla_env  # noqa: E402

# Eight fake CPU devices so sharding tests can build real meshes, and cheap CPU code generation
# (tests/xla_env.py says why); must precede the jax import.
xla_env.set_defaults()
# One persistent XLA cache for the whole test session, its pytest-xdist workers and the scripts the
# tests start: most tests build the same tiny models, so a program compiled once (in any process)
# is read back elsewhere. Set in the environment so that subprocesses inherit it; a fresh
# directory per session (keyed by the controlling process), so nothing carries over between runs.
# A directory given in the environment (.ci/run gives one to both tiers) is used and left in place.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"t5gemma2-tests-xla-{os.getpid()}")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import itertools

import pytest


@pytest.fixture(scope="session")
def gcs():
    """A real GCS JSON API on 127.0.0.1 for the whole session (in memory), with the variables that
    point every storage client at it set in this process, and so in every subprocess a test starts."""
    from gcs_emulator import GcsEmulator

    emulator = GcsEmulator().start()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())
    yield emulator
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emulator.stop()


_buckets = itertools.count()


@pytest.fixture
def bucket(gcs) -> str:
    """A new, empty bucket of the session's emulator: `gs://<name>`."""
    return gcs.create_bucket(f"test-{os.getpid()}-{next(_buckets)}")

def pytest_sessionfinish(session, exitstatus):
    # The controlling process (not an xdist worker) removes the cache it made.
    if _OWN_XLA_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

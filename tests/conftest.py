import os
import sys

# Eight fake CPU devices so sharding tests can build real meshes; must precede the jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent XLA cache for the whole test session, its pytest-xdist workers and the scripts the
# tests start: most tests build the same tiny models, so a program compiled once (in any process)
# is read back elsewhere. Set in the environment so that subprocesses inherit it; a fresh
# directory per session (keyed by the controlling process), so nothing carries over between runs.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"t5gemma2-tests-xla-{os.getpid()}")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
sys.path.insert(0, os.path.dirname(__file__))   # shared helpers (hf_reference.py) for all test folders


def pytest_sessionfinish(session, exitstatus):
    # The controlling process (not an xdist worker) removes the cache it made.
    if _OWN_XLA_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

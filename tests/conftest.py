import os
import sys

# Eight fake CPU devices so sharding tests can build real meshes; must precede the jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))   # shared helpers (hf_reference.py) for all test folders

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

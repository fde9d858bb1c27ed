import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # helpers.py


@pytest.fixture(scope="package", autouse=True)
def _compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this package's tests only: the same step compiled in two tests (or
    in a test and its resumed run) is compiled once. Restored to the previous setting afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    old = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    cc.reset_cache()
    cc.set_cache_dir(str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", old)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)

"""Test setup, before jax loads: 8 fake CPU devices (sharding tests), strict rank promotion, most
XLA optimisations off outside parity tests, and one persistent XLA compilation cache per test
session, shared by the xdist workers and by every subprocess a test starts (they inherit the
environment), so a program compiled by one test is read back, not compiled again, by the next
test or process that builds the same one. Compiled programs are freed after each test file."""

import atexit
import gc
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh cache per session (the pytest process that creates it removes it at exit); set
# JAX_COMPILATION_CACHE_DIR yourself to keep one across runs. The cache key covers the program,
# compile options, devices, jax/jaxlib versions and XLA_FLAGS (the fake device count aside),
# so a hit is the executable a fresh compile would give. A size bound turns on its file lock
# (two workers write to it concurrently).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxdyn-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
# Most XLA optimisations off, here and in every subprocess: the suite is compile-bound on a
# 2-core machine and this cuts its time by about a quarter. Tests marked `parity` (equality with
# an outside reference or with another run) compile fully optimised (`_full_xla_for_parity`).
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs everything optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _full_xla_for_parity(request, monkeypatch):
    """Parity tests compile (and start their subprocesses) with every XLA optimisation on."""
    if request.node.get_closest_marker("parity") is None:
        yield
        return
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop jax's in-memory compilation caches after each test file. Every compiled program
    keeps its machine code in its own memory mappings (an op-by-op apply of a routed model
    compiles hundreds of small programs, ~600 mappings); a worker that keeps every program
    of ~300 tests passes the kernel's limit of 65,530 mappings (vm.max_map_count), and XLA then
    aborts or segfaults inside a compile or a cache write. Programs compiled for 0.5 s or more
    come back from the persistent cache."""
    yield
    jax.clear_caches()
    gc.collect()


# Multi-minute tests (marked `slow`: subprocess trainings, 8-device parity) start first, so
# that neither xdist worker is left running one of them alone at the end of the suite.
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable sort

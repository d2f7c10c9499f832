"""Test setup, before jax loads: 8 fake CPU devices (sharding tests), strict rank promotion, and
one persistent XLA compilation cache per test session, written by the subprocesses tests start
(they inherit the environment) and read by them and by the xdist workers, so a program one
process compiled is read back, not compiled again, by the next that builds the same one."""

import atexit
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

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# The test processes themselves read the cache but never write to it; the subprocesses tests
# start (CLIs, launch scripts) do both. Serialising an executable for the cache segfaulted
# inside XLA (`executable.serialize()` in jax's put_executable_and_time) in a long-lived xdist
# worker twice, at the same test, and never in a fresh process; see docs/testing.md.
jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))

# Multi-minute tests (marked `slow`: subprocess trainings, 8-device parity) start first, so
# that neither xdist worker is left running one of them alone at the end of the suite.


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable sort

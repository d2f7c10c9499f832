"""The test processes stay under the kernel's memory-mapping limit: compiled programs hold
mappings until jax's caches drop them, which `tests/conftest.py` does after every test file."""

import gc
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxdyn.model import build, init_params, tiny


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_clearing_the_caches_frees_the_mappings_of_compiled_programs():
    cfg = tiny("qwen2", arch="dtf", vocab_size=64, max_position_embeddings=64)
    params = init_params(cfg, jax.random.key(0))
    jax.clear_caches()
    gc.collect()
    before = mappings()
    # op by op: every primitive is its own small program
    build(cfg, "causal").apply({"params": params}, jnp.ones((1, 8), jnp.int32))
    grown = mappings() - before
    assert grown > 200, grown  # what made long-lived workers reach vm.max_map_count
    jax.clear_caches()
    gc.collect()
    assert mappings() - before < grown / 4, (grown, mappings() - before)

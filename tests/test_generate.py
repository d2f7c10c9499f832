"""Generation: cached decode equals full forward, compiles once, padding and sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.generate import compiled_steps, generate
from jaxdyn.model import build, init_params, tiny
from jaxdyn.sampling import SamplingConfig, filter_logits, sample


@pytest.fixture(scope="module")
def model():
    cfg = tiny("qwen2")
    return cfg, init_params(cfg, jax.random.key(0))


def greedy_reference(cfg, params, prompt, n):
    """Greedy continuation by full forward passes, no cache."""
    seq = list(prompt)
    m = build(cfg)
    for _ in range(n):
        logits = m.apply({"params": params}, jnp.asarray([seq])).logits
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def test_greedy_cached_equals_uncached(model):
    cfg, params = model
    prompt = [3, 17, 42, 5, 9]
    res = generate(cfg, params, [prompt], max_new_tokens=12)
    assert res.tokens[0] == greedy_reference(cfg, params, prompt, 12)


def test_left_padded_batch_equals_single_prompts(model):
    cfg, params = model
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [200]]
    batched = generate(cfg, params, prompts, max_new_tokens=8).tokens
    for p, b in zip(prompts, batched, strict=True):
        assert generate(cfg, params, [p], max_new_tokens=8).tokens[0] == b


def test_decode_step_compiles_once(model):
    cfg, params = model
    sampling = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9)  # unique to this test
    _, step = compiled_steps(cfg, sampling)
    assert step._cache_size() == 0
    res = generate(cfg, params, [[1, 2, 3]], max_new_tokens=20, sampling=sampling)
    assert res.decode_steps == 19 and step._cache_size() == 1
    generate(cfg, params, [[4, 5, 6, 7]], max_new_tokens=20, sampling=sampling, seed=1)
    assert step._cache_size() == 1


def test_eos_stops_row(model):
    cfg, params = model
    first = generate(cfg, params, [[1, 2, 3]], max_new_tokens=6).tokens[0]
    eos = first[2]
    stopped = generate(cfg, params, [[1, 2, 3]], max_new_tokens=6, eos_id=eos).tokens[0]
    assert stopped == first[:first.index(eos) + 1]


def test_bad_prompts_are_clear_errors(model):
    cfg, params = model
    with pytest.raises(ValueError, match="empty"):
        generate(cfg, params, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        generate(cfg, params, [[1] * 2040], max_new_tokens=20)


def test_top_k_and_top_p_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)) > -1e30
    assert kept_k.tolist() == [[True, True, False, False]]
    kept_p = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.8)) > -1e30
    assert kept_p.tolist() == [[True, True, False, False]]
    kept_p = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.81)) > -1e30
    assert kept_p.tolist() == [[True, True, True, False]]
    draws = jax.vmap(lambda r: sample(logits[0:1].repeat(1, 0), r,
                                      SamplingConfig(temperature=1.0, top_k=2)))(
        jax.random.split(jax.random.key(0), 256))
    assert set(np.unique(draws).tolist()) == {0, 1}


def test_repetition_penalty_changes_greedy_choice():
    logits = jnp.array([[2.0, 1.9, -1.0]])
    seen = jnp.array([[True, False, False]])
    s = SamplingConfig(repetition_penalty=1.2)
    assert int(sample(logits, jax.random.key(0), s, seen)[0]) == 1
    assert int(sample(logits, jax.random.key(0), SamplingConfig(), seen)[0]) == 0

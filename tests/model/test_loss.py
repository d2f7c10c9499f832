"""Chunked cross-entropy equals the naive one; labels shift once, never across documents."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.model.loss import chunked_cross_entropy, lm_loss, shifted_targets


def naive(h, w, y, m):
    logits = jnp.einsum("btd,dv->btv", h, w)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]
    return jnp.sum(nll * m) / jnp.sum(m)


def test_chunked_equals_naive_value_and_grad():
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (3, 7, 16))
    w = jax.random.normal(k[1], (16, 50))
    y = jax.random.randint(k[2], (3, 7), 0, 50)
    m = (jnp.arange(7) < 6)[None].repeat(3, 0)
    f = lambda h, w: chunked_cross_entropy(h, w, y, m, chunk=4)[0]  # 21 rows -> ragged chunks
    g = lambda h, w: naive(h, w, y, m)
    np.testing.assert_allclose(f(h, w), g(h, w), rtol=1e-6)
    for a, b in zip(jax.grad(f, (0, 1))(h, w), jax.grad(g, (0, 1))(h, w), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_target_of_t_is_t_plus_one_within_document():
    tokens = jnp.array([[10, 11, 12, 20, 21, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    y, m = shifted_targets(tokens, seg)
    assert y[0, :5].tolist() == [11, 12, 20, 21, 0]
    # position 2 (last of doc 1) must not predict doc 2's first token; padding predicts nothing
    assert m[0].tolist() == [True, True, False, True, False, False]
    y3, m3 = shifted_targets(tokens, seg, shift=2)
    assert y3[0, 0] == 12 and m3[0].tolist() == [True, False, False, False, False, False]


def test_extra_mask_restricts_targets():
    h = jnp.ones((1, 4, 8))
    w = jax.random.normal(jax.random.key(0), (8, 10))
    tokens = jnp.array([[1, 2, 3, 4]])
    _, stats = lm_loss(h, w, tokens, extra_mask_BT=jnp.array([[0, 0, 1, 1]]))
    assert int(stats["tokens"]) == 2  # targets at positions 2 and 3 only

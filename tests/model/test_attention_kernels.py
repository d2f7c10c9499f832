"""Every attention kernel equals the dense-mask XLA reference and never crosses documents.

All kernel paths run on CPU: `blockwise` natively, `splash` (the TPU Pallas kernel) and
`pallas_gpu` (the Pallas Triton GPU kernel) in Pallas interpret mode (jax 0.10.2 runs both
kernels, forward and backward, with `interpret=True` on CPU). Nothing here is skipped.
Shapes are small and lengths deliberately not multiples of the block, so internal padding is
exercised; fp32, tolerance 1e-5 on outputs and gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.model import build, init_cache, init_params, tiny
from jaxdyn.model.attention import attend, cache_spec, pick_implementation, self_spec
from jaxdyn.model.flash import MaskSpec, blockwise_attention, visible

KERNELS = ["blockwise", "splash", "pallas_gpu"]
ALL = ["xla", *KERNELS]
TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
             vocab_size=128, num_layers=2, rotary_pct=0.5, attention_block=8)


def packed(B: int = 2, T: int = 29) -> tuple[np.ndarray, np.ndarray]:
    """Rows with several documents (packed positions restart) and trailing padding (seg 0)."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    cuts = [(0, 9, 1), (9, 20, 2), (20, 25, 3)], [(0, 4, 1), (4, T, 2)]
    for b in range(B):
        for lo, hi, s in cuts[b % 2]:
            seg[b, lo:hi], pos[b, lo:hi] = s, np.arange(hi - lo)
    return pos, seg


def qkv(B=2, T=29, N=4, K=2, H=16, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda heads: jnp.asarray(r.normal(size=(B, T, heads, H)), jnp.float32)
    return mk(N), mk(K), mk(K)


# ------------------------------------------------------------------ the attention entry point


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("segments", [True, False])
def test_kernel_equals_reference_forward_and_grad(impl, segments):
    q, k, v = qkv()
    B, T = q.shape[:2]
    seg = jnp.asarray(packed(B, T)[1]) if segments else None
    spec = self_spec(seg, B, T)
    w = jax.random.normal(jax.random.key(3), q.shape)

    def loss(impl, q, k, v):
        cfg = tiny(attention_impl=impl, attention_block=8)
        out = attend(q, k, v, spec, cfg, segments=segments, self_attention=True)
        return jnp.sum(out * w), out

    (_, ref), g_ref = jax.value_and_grad(functools.partial(loss, "xla"), (0, 1, 2),
                                         has_aux=True)(q, k, v)
    (_, out), g = jax.value_and_grad(functools.partial(loss, impl), (0, 1, 2),
                                     has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, ref, **TOL)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    if segments:  # padding query rows are exactly zero
        assert not np.any(np.asarray(out)[np.asarray(seg) == 0])


@pytest.mark.parametrize("block", [3, 8, 64])
def test_blockwise_any_block_and_cross_attention(block):
    """Queries and keys of different lengths (a decode-like mask), blocks not dividing them."""
    q, _, _ = qkv(T=7)
    _, k, v = qkv(T=19, seed=1)
    written = jnp.asarray(np.arange(19)[None] % 4 != 1).repeat(2, 0)
    spec = cache_spec(written, jnp.asarray(9), 7)
    ref_mask = visible(spec)
    ref = jax.nn.dot_product_attention(q, k, v, mask=ref_mask[:, None], scale=0.25)
    out = blockwise_attention(q, k, v, spec, 0.25, block)
    np.testing.assert_allclose(out, ref, **TOL)


def test_fully_masked_rows_are_zero_with_zero_grad():
    q, k, v = qkv(B=1, T=6)
    seg = jnp.zeros((1, 6), jnp.int32)
    spec = MaskSpec(seg, seg, seg, seg)  # every key has segment 0: nothing is visible
    out, vjp = jax.vjp(lambda q, k, v: blockwise_attention(q, k, v, spec, 0.25, 4), q, k, v)
    assert not np.any(np.asarray(out))
    for g in vjp(jnp.ones_like(out)):
        assert np.all(np.isfinite(g)) and not np.any(np.asarray(g))


def test_auto_picks_blockwise_on_cpu_and_self_only_kernels_fall_back():
    cfg = tiny()
    if jax.default_backend() == "cpu":
        assert pick_implementation(cfg, jnp.float32, True, True) == "blockwise"
    for impl in ("splash", "pallas_gpu"):
        assert pick_implementation(tiny(attention_impl=impl), jnp.float32, True, False) \
            == "blockwise"
    assert pick_implementation(tiny(attention_impl="xla"), jnp.float32, True, True) == "xla"


# ------------------------------------------------------------------------------- full models


@functools.cache
def _params(arch: str):
    cfg = model_cfg("xla", arch)
    return jax.jit(lambda r: init_params(cfg, r))(jax.random.key(0))


def model_cfg(impl: str, arch: str = "dense"):
    routing = {"dense": {}, "mod": dict(capacity=0.5), "dtf": dict(capacity=0.5)}[arch]
    return tiny("qwen2", arch=arch, routing=routing, attention_impl=impl, **SMALL)


@functools.cache
def model_loss(impl: str, arch: str):
    """jit(value_and_grad) of a packed-batch loss; the aux output is the logits."""
    model = build(model_cfg(impl, arch))

    def f(params, tokens, pos, seg):
        logits = model.apply({"params": params}, tokens, pos, seg).logits
        return jnp.sum(jnp.sin(logits) * (seg != 0)[..., None]), logits
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def batch(B=2, T=29, seed=1):
    pos, seg = packed(B, T)
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, SMALL["vocab_size"])
    return tokens, jnp.asarray(pos), jnp.asarray(seg)


def close_to_scale(a, b):
    """fp32 agreement relative to the leaf's scale: parameter gradients sum over every token, so
    their rounding grows with their size (|grad| reaches ~200 here)."""
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * (1.0 + float(np.max(np.abs(b)))))


@pytest.mark.parametrize("impl,arch", [(i, "dense") for i in ALL]
                         + [("blockwise", "mod"), ("blockwise", "dtf")])
def test_model_equals_reference_and_never_crosses_documents(impl, arch):
    """Packed rows, padding, GQA (4 query / 2 kv heads), partial rotary (half the dims): logits
    and every parameter gradient equal the XLA reference.

    Dense models also check isolation: changing the first document of each row leaves every
    later document's logits bit-unchanged. A kernel that ignored segment ids would let them see
    the changed tokens (they come earlier in the row, so causality alone would not hide them).
    Routed models are exempt: the router's top-k over the whole row legitimately depends on
    every document.
    """
    params = _params(arch)
    tokens, pos, seg = batch()
    (_, ref), g_ref = model_loss("xla", arch)(params, tokens, pos, seg)
    (_, out), g = model_loss(impl, arch)(params, tokens, pos, seg)
    np.testing.assert_allclose(out, ref, **TOL)
    jax.tree.map(close_to_scale, g, g_ref)
    if arch == "dense":
        changed = jnp.where(seg == 1, (tokens + 7) % SMALL["vocab_size"], tokens)
        (_, out2), _ = model_loss(impl, arch)(params, changed, pos, seg)
        a, b, s = np.asarray(out), np.asarray(out2), np.asarray(seg)
        np.testing.assert_array_equal(a[s >= 2], b[s >= 2])
        assert not np.allclose(a[s == 1], b[s == 1])


def test_cached_decode_equals_full_forward():
    """Prefill, then one token at a time, through the blockwise path (the cache mask: key
    "segment" = written flag, key position = slot, query position = index + t)."""
    cfg = model_cfg("blockwise")
    params = _params("dense")
    apply = jax.jit(build(cfg).apply)
    tokens = jax.random.randint(jax.random.key(2), (2, 21), 0, cfg.vocab_size)
    full = apply({"params": params}, tokens).logits
    out = apply({"params": params}, tokens[:, :11], cache=init_cache(cfg, 2, 24))
    steps, cache = [out.logits], out.cache
    for t in range(11, 21):
        out = apply({"params": params}, tokens[:, t:t + 1], cache=cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, **TOL)


def test_blockwise_backward_memory_is_linear_in_T_inside_a_layer_scan():
    """Compiled temp memory of grad through two scanned layers (the trunk's `nn.scan` case,
    where JAX once stacked every tile's probabilities as residuals) at most doubles with T."""

    def temp_bytes(T: int) -> int:
        x = jax.ShapeDtypeStruct((1, T, 4, 16), jnp.float32)
        w = jax.ShapeDtypeStruct((2, 16, 16), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, T), jnp.int32)

        def loss(w_LHH, x_BTNH, pos_BT, seg_BT):
            def layer(h_BTNH, w_HH):
                q_BTNH = h_BTNH @ w_HH
                k_BTKH = q_BTNH[:, :, :2]
                spec = MaskSpec(pos_BT, seg_BT, pos_BT, seg_BT)
                return h_BTNH + blockwise_attention(q_BTNH, k_BTKH, k_BTKH, spec, 0.25, 64), None
            return jnp.sum(jax.lax.scan(layer, x_BTNH, w_LHH)[0])

        compiled = jax.jit(jax.grad(loss)).lower(w, x, ids, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(512), temp_bytes(1024)
    assert large <= 2.3 * small, (small, large)

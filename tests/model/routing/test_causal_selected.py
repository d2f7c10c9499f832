"""Causal mode on the selected tokens (capacity buckets) and compact routed KV caches
(docs/features/routing.md §7): equal to the compute-and-mask reference, cached decoding equal to
the full forward, memory, overflow policy and the bucket choice."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdyn.model import ConfigError, build, init_cache, init_params, tiny
from jaxdyn.model.block import DecoderLayer, init_layer_cache
from jaxdyn.model.routing import causal as C
from jaxdyn.model.routing.options import routing_opts
from jaxdyn.model.routing.transfer import unstack_layers

SMALL = dict(hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
             vocab_size=128, num_layers=2)  # one scan unit
LCFG = tiny("qwen2", hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


def model_cfg(arch, scan=True, **routing):
    if routing.get("causal_compute") == "selected":  # the default: share the compiled forward
        routing.pop("causal_compute")
    return tiny("qwen2", arch=arch, routing=routing, scan_layers=scan, **SMALL)


@functools.cache
def _stacked(arch):
    return jax.jit(lambda r: init_params(model_cfg(arch), r))(jax.random.key(0))


def _params(arch, scan):
    """The same parameters for the scanned and the unrolled stack."""
    return _stacked(arch) if scan else unstack_layers(_stacked(arch))


@functools.cache
def fwd(cfg):
    return jax.jit(lambda p, t, pos=None, seg=None: build(cfg, "causal").apply(
        {"params": p}, t, pos, seg, mutable=["intermediates"]))


def decisions(cfg, p, *args):
    """Routed-layer decisions [U, B, T] (sown by the unrolled stack; a scan drops them)."""
    p = unstack_layers(p)
    _, st = fwd(cfg.replace(scan_layers=False))(p, *args)
    return np.asarray(st["intermediates"]["layers_0"]["decision"][0])[None]


def predictor(p, fn):
    """`p` with every unit's causal-predictor weights replaced by `fn(name, w)`."""
    def fix(path, w):
        names = [getattr(k, "key", "") for k in path]
        return fn(names[-1], w) if "predictor" in names else w
    return jax.tree_util.tree_map_with_path(fix, p)


ALL = lambda n, w: jnp.zeros_like(w) if n == "fc1" else w  # c = 0: d = 1 everywhere


def NONE(n, w):
    """Hidden units in pairs (h, −h) with equal weights −|w|: c = −Σ|w|·(silu(h) + silu(−h))
    = −Σ|w|·h·tanh(h/2) < 0 for every token, d = 0 everywhere."""
    half = w.shape[1] // 2 if n == "fc1" else w.shape[0] // 2
    if n == "fc1":
        return 10.0 * jnp.concatenate([w[:, :half], -w[:, :half]], axis=1)
    return -jnp.abs(jnp.concatenate([w[:half], w[:half]], axis=0))


def left_padded(B=3, T=16, seed=1):
    """Rows of 16, 11 and 6 real tokens, left-padded like `decode.generate.left_pad`."""
    t = jax.random.randint(jax.random.key(seed), (B, T), 0, SMALL["vocab_size"])
    n = np.array([T, T - 5, T - 10])[:B]
    valid = np.arange(T)[None] >= (T - n)[:, None]
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    return jnp.where(valid, t, 0), jnp.asarray(pos), jnp.asarray(valid.astype(np.int32))


# ----------------------------------------------------------------------------- model level


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_selected_equals_masked_left_padded(arch):
    t, pos, seg = left_padded()
    v = np.asarray(seg) > 0
    p = _params(arch, False)
    ref = fwd(model_cfg(arch, False, causal_compute="masked"))(p, t, pos, seg)[0].logits
    for scan in (True, False):
        a = fwd(model_cfg(arch, scan))(_params(arch, scan), t, pos, seg)[0].logits
        np.testing.assert_allclose(np.asarray(a)[v], np.asarray(ref)[v], atol=1e-5, rtol=0)
    d = decisions(model_cfg(arch), p, t, pos, seg) & v[None]
    assert 0 < d.sum(-1).max() < 16  # neither bucket 0 nor T: a strict sub-bucket ran


@pytest.mark.parametrize("arch,force,count", [("mod", ALL, 16), ("dtf", NONE, 0)])
def test_selected_equals_masked_all_and_no_tokens(arch, force, count):
    p = predictor(_params(arch, False), force)
    t = jax.random.randint(jax.random.key(2), (2, 16), 0, SMALL["vocab_size"])
    (a, _), (b, _) = (fwd(model_cfg(arch, False, causal_compute=m))(p, t)
                       for m in ("selected", "masked"))
    assert decisions(model_cfg(arch), p, t).sum(-1).max() == count  # bucket T / bucket 0
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,scan,B", [("mod", True, 2), ("dtf", False, 1)])
def test_cached_decode_with_compact_cache_equals_full_forward(arch, scan, B):
    cfg = model_cfg(arch, scan, cache_fraction=0.75)
    p = _params(arch, scan)
    T, P = 12, 5
    t = jax.random.randint(jax.random.key(3), (B, T), 0, SMALL["vocab_size"])
    full, _ = fwd(cfg)(p, t)
    apply = jax.jit(lambda p, t, c: build(cfg, "causal").apply({"params": p}, t, cache=c))
    out = apply(p, t[:, :P], init_cache(cfg, B, T + 4))
    steps, cache = [out.logits], out.cache
    for i in range(P, T):
        out = apply(p, t[:, i:i + 1], cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full.logits, atol=1e-5, rtol=0)
    c = cache["layers"]["routed" if arch == "mod" else "dyn"]
    assert set(c) == set(C.COMPACT_KEYS) and c["k"].shape[2] == 12  # ceil(0.75·16)
    d = decisions(cfg, p, t)  # [U, B, T]
    assert 0 < d[:, :, P:].sum() < d[:, :, P:].size  # decode steps both ran and skipped
    np.testing.assert_array_equal(c["ptr"], d.sum(-1))
    for u, b in np.ndindex(*d.shape[:2]):
        np.testing.assert_array_equal(c["slot"][u, b, :d[u, b].sum()], np.flatnonzero(d[u, b]))
    assert int(jnp.sum(C.cache_overflow(cache))) == 0


def test_compact_cache_memory_scales_with_the_fraction():
    S = 64
    full = init_cache(model_cfg("mod", capacity=0.5), 2, S)["layers"]["routed"]
    for routing, frac in [({"capacity": 0.125}, 0.25), ({"cache_fraction": 0.5}, 0.5),
                          ({"capacity": 0.3, "cache_fraction": 0.125}, 0.125)]:
        cfg = model_cfg("mod", **routing)
        assert C.cache_fraction(routing_opts(cfg)) == frac
        c = init_cache(cfg, 2, S)["layers"]["routed"]
        kv = lambda c: c["k"].nbytes + c["v"].nbytes
        assert kv(c) == frac * kv(full) and c["k"].shape[2] == frac * S
    assert set(full) == {"k", "v", "written"}  # γ = 0.5: auto fraction 1, the full layout
    dtf = init_cache(model_cfg("dtf", capacity=0.25), 1, S)["layers"]
    assert dtf["dyn"]["k"].shape[2] == S // 2 and dtf["dec"]["k"].shape[2] == S


def test_options_are_validated():
    for bad in ({"causal_compute": "all"}, {"causal_buckets": 0}, {"causal_buckets": 2.0},
                {"cache_fraction": 0.0}, {"cache_fraction": 1.5}, {"cache_fraction": "half"}):
        with pytest.raises(ConfigError):
            model_cfg("mod", **bad)


# ----------------------------------------------------------------------------- layer level


class Layer(nn.Module):
    """One routed DecoderLayer in causal mode with given decisions."""

    opt: dict

    @nn.compact
    def __call__(self, x, gate, d, pos, valid=None, cache=None, index=None):
        ctx = {"pos_BT": pos, "seg_BT": None if valid is None else valid.astype(jnp.int32),
               "index": index}
        return C.causal_routed(DecoderLayer(LCFG, name="block"), x, gate, d, valid, cache, ctx,
                               self.opt, self.is_initializing())


OPT = {"causal_compute": "selected", "causal_buckets": 4, "capacity_multiple": 1,
       "dispatch": "gather"}


@functools.cache
def layer_params():
    x = jnp.zeros((1, 8, LCFG.hidden_size))
    return jax.jit(Layer(OPT).init)(jax.random.key(0), x, x[..., 0], x[..., 0] > 0,
                                    jnp.zeros((1, 8), jnp.int32))


@functools.cache
def layer_fn(**opt):
    return jax.jit(Layer({**OPT, **opt}).apply)


def layer_inputs(B, T, seed=0):
    kx, kg = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (B, T, LCFG.hidden_size))
    gate = jax.nn.sigmoid(jax.random.normal(kg, (B, T)))
    return x, gate, jnp.broadcast_to(jnp.arange(T), (B, T))


T16 = np.arange(16)
PATTERNS = {  # decisions [2, 16] and the bucket (capacity) they need
    "none": (np.zeros((2, 16), bool), 0),
    "one": (np.stack([T16 == 5, T16 < 0]), 2),
    "few": (np.stack([T16 % 8 == 1, T16 % 5 == 0]), 4),
    "mixed": (np.stack([T16 % 2 == 0, T16 % 3 == 0]), 8),
    "all": (np.stack([T16 >= 0, T16 % 4 == 0]), 16),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_bucket_outcomes_equal_masked(name):
    d, k = PATTERNS[name]
    x, gate, pos = layer_inputs(2, 16)
    assert C.bucket_sizes(4, 16)[int(C.pick_bucket(C.bucket_sizes(4, 16),
                                                   jnp.asarray(d.sum(1).max())))] == k
    valid = jnp.asarray(T16 >= 3)[None].repeat(2, 0)  # left padding, positions from 0
    pos = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
    for v in (None, valid):
        a = layer_fn()(layer_params(), x, gate, jnp.asarray(d), pos, v)[0]
        b = layer_fn(causal_compute="masked")(layer_params(), x, gate, jnp.asarray(d), pos, v)[0]
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        sel = d if v is None else d & np.asarray(valid)
        np.testing.assert_array_equal(np.asarray(a)[~sel], np.asarray(x)[~sel])  # d = 0: x
    if name != "none":  # the masked reference is not trivially equal to x
        assert not np.allclose(a, x)
    if name == "mixed":  # the [B,k,T] one-hot dispatch gives the same result
        c = layer_fn(dispatch="onehot")(layer_params(), x, gate, jnp.asarray(d), pos, valid)[0]
        np.testing.assert_allclose(c, b, atol=1e-5, rtol=0)


def test_bucket_choice_covers_the_largest_row(monkeypatch):
    sizes = C.bucket_sizes(4, 16)
    assert sizes == (0, 2, 4, 8, 16) and C.bucket_sizes(3, 20, 8) == (0, 8, 16, 20)
    assert C.bucket_sizes(1, 5) == (0, 5)
    for count in range(17):
        k = sizes[int(C.pick_bucket(sizes, jnp.asarray(count)))]
        assert k >= count and (k == 0 or sizes[sizes.index(k) - 1] < count)
    # The check has teeth: one bucket too small drops selected tokens and changes the output.
    d, _ = PATTERNS["mixed"]
    x, gate, pos = layer_inputs(2, 16)
    ref = layer_fn(causal_compute="masked")(layer_params(), x, gate, jnp.asarray(d), pos)[0]
    pick = C.pick_bucket
    monkeypatch.setattr(C, "pick_bucket", lambda s, c: jnp.maximum(pick(s, c) - 1, 0))
    bad = jax.jit(Layer(OPT).apply)(layer_params(), x, gate, jnp.asarray(d), pos)[0]
    assert not np.allclose(bad, ref, atol=1e-3)


def _decode(fn, params, x, gate, d, pos, cache, P):
    """Prefill P tokens, then one token per call; returns (outputs [B, T, D], cache)."""
    y, cache = fn(params, x[:, :P], gate[:, :P], d[:, :P], pos[:, :P], None, cache,
                  jnp.int32(0))
    ys = [y]
    for i in range(P, x.shape[1]):
        y, cache = fn(params, x[:, i:i + 1], gate[:, i:i + 1], d[:, i:i + 1],
                      pos[:, i:i + 1], None, cache, jnp.int32(i))
        ys.append(y)
    return jnp.concatenate(ys, 1), cache


@pytest.mark.parametrize("B,slots", [(1, 16), (3, 8), (4, None)])
def test_layer_cached_decode_equals_full_forward(B, slots):
    """Row buckets (B > 1 decoding) and token buckets (prefill), compact (S_c slots) and full
    (None) layouts, with random decisions."""
    T, P = 12, 4
    x, gate, pos = layer_inputs(B, T, seed=B)
    d = jax.random.bernoulli(jax.random.key(7 + B), 0.5, (B, T))
    full = layer_fn()(layer_params(), x, gate, d, pos)[0]
    cache = init_layer_cache(LCFG, B, 16, jnp.float32)
    if slots is not None:
        cache = {"k": jnp.zeros((B, slots, 1, 16)), "v": jnp.zeros((B, slots, 1, 16)),
                 "slot": jnp.zeros((B, slots), jnp.int32),
                 "ptr": jnp.zeros((B,), jnp.int32), "overflow": jnp.zeros((B,), jnp.int32)}
    assert int(d.sum(1).max()) <= (slots or 16)
    for mode in ("selected", "masked"):
        y, c = _decode(layer_fn(causal_compute=mode), layer_params(), x, gate, d, pos, cache, P)
        np.testing.assert_allclose(y, full, atol=1e-5, rtol=0)
        if slots is None:
            np.testing.assert_array_equal(c["written"][:, :T], d)
        else:
            np.testing.assert_array_equal(c["ptr"], d.sum(1))
            assert not c["overflow"].any()


def test_overflow_drops_selected_tokens_and_counts_them():
    """Policy: once a row's compact cache is full, its further selected tokens are d = 0."""
    B, T, P, S = 2, 10, 6, 4
    x, gate, pos = layer_inputs(B, T, seed=5)
    d = jnp.ones((B, T), bool).at[1, :3].set(False)
    cache = {"k": jnp.zeros((B, S, 1, 16)), "v": jnp.zeros((B, S, 1, 16)),
             "slot": jnp.zeros((B, S), jnp.int32), "ptr": jnp.zeros((B,), jnp.int32),
             "overflow": jnp.zeros((B,), jnp.int32)}
    y, c = _decode(layer_fn(), layer_params(), x, gate, d, pos, cache, P)
    kept = d & (jnp.cumsum(d, 1) <= S)  # the first S selected tokens of each row
    ref = layer_fn()(layer_params(), x, gate, kept, pos)[0]
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)
    assert not np.allclose(y, layer_fn()(layer_params(), x, gate, d, pos)[0], atol=1e-3)
    np.testing.assert_array_equal(c["overflow"], [T - S, T - 3 - S])
    np.testing.assert_array_equal(c["ptr"], [S, S])
    np.testing.assert_array_equal(c["slot"], [[0, 1, 2, 3], [3, 4, 5, 6]])
    model = {"index": 0, "layers": {"dense": {"k": 0}, "routed": {
        **c, "overflow": jnp.stack([c["overflow"], c["overflow"]])}}}
    np.testing.assert_array_equal(C.cache_overflow(model), 2 * np.asarray(c["overflow"]))


def test_compact_cache_rewinds_to_the_call_index():
    """Entries written from slots >= index are dropped: re-decoding from an earlier index
    gives the same result as decoding straight."""
    B, T, P = 2, 10, 6
    x, gate, pos = layer_inputs(B, T, seed=9)
    d = jax.random.bernoulli(jax.random.key(4), 0.6, (B, T))
    cache = C.init_routed_cache(model_cfg("mod", cache_fraction=0.75), B, 16, jnp.float32)
    fn = layer_fn()
    y, c = _decode(fn, layer_params(), x, gate, d, pos, cache, P)
    x2 = x.at[:, 8:].add(1.0)  # rewind to index 8 with different tokens
    y2, _ = fn(layer_params(), x2[:, 8:], gate[:, 8:], d[:, 8:], pos[:, 8:], None, c,
               jnp.int32(8))
    ref = fn(layer_params(), x2, gate, d, pos)[0]
    np.testing.assert_allclose(y2, ref[:, 8:], atol=1e-5, rtol=0)

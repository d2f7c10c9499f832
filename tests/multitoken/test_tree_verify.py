"""Tree verification of the multi-token heads: the tree attention mask, greedy output equal to
plain greedy decoding, head 1's distribution kept under sampling, the cache after verify equal
to a fresh prefill of the same tokens, and at least the chain's tokens per forward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdyn.decode.generate import generate
from jaxdyn.decode.sampling import SamplingConfig
from jaxdyn.model import build, tiny
from jaxdyn.model.attention import cache_spec, call_mask
from jaxdyn.model.flash import visible
from jaxdyn.multitoken.decode import generate_verify, verify_steps
from jaxdyn.multitoken.heads import (
    all_logits,
    dense_params_of,
    init_mtp_cache,
    init_mtp_params,
    multitoken_model,
)
from jaxdyn.multitoken.objective import markov_corpus, multitoken_loss
from jaxdyn.multitoken.tree import Tree, parse_tree
from tests.multitoken.stats import chi2_ok

CFG = tiny("qwen2", vocab_size=34, max_position_embeddings=128)  # GQA: 4 query, 2 kv heads
V = CFG.vocab_size
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [20], [30, 31, 4, 4]]
SPARSE = Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0)])


@pytest.fixture(scope="module")
def untrained():
    return init_mtp_params(CFG, 3, jax.random.key(3))


def test_tree_forward_equals_a_plain_forward_of_each_nodes_path(untrained):
    """After a cached prefill, one forward over the tree (positions = prefix length + depth,
    the ancestor mask) gives every node, in every head, the logits of a plain forward over
    prefix + the node's root-to-node path; without the mask it does not."""
    params = untrained
    model = multitoken_model(CFG, 3)
    apply = jax.jit(model.apply)
    tree, prompt = Tree.product((3, 2)), [4, 9, 2, 17, 5]
    toks = np.random.default_rng(2).integers(0, V, tree.size).astype(np.int32)
    pos = (len(prompt) + tree.depth_N)[None].astype(np.int32)
    cache = apply({"params": params}, jnp.asarray([prompt]), None, None,
                  init_mtp_cache(CFG, 3, 1, 32)).cache

    def tree_logits(mask):
        out = apply({"params": params}, jnp.asarray(toks[None]), jnp.asarray(pos), None, cache,
                    attn_mask_BTT=mask)
        return np.asarray(all_logits(out))[:, 0]  # [n, N, V]

    N = tree.size
    got = tree_logits(jnp.asarray(tree.ancestors_NN[None]))
    causal = tree_logits(jnp.asarray(np.tril(np.ones((1, N, N), bool))))  # sees siblings too
    # Reference: all N sequences prefix + path in one right-padded batch (segment 0 = pad).
    seqs = [prompt + [int(t) for t, a in zip(toks, tree.ancestors_NN[u], strict=True) if a]
            for u in range(N)]
    L = max(len(q) for q in seqs)
    tokens, seg = np.zeros((N, L), np.int32), np.zeros((N, L), np.int32)
    for u, q in enumerate(seqs):
        tokens[u, :len(q)], seg[u, :len(q)] = q, 1
    ref = np.asarray(all_logits(apply({"params": params}, jnp.asarray(tokens), None,
                                      jnp.asarray(seg))))  # [n, N, L, V]
    last = np.array([len(q) - 1 for q in seqs])
    ref = ref[:, np.arange(N), last]  # [n, N, V]
    assert np.allclose(got, ref, atol=1e-4)
    assert not np.allclose(causal, ref, atol=1e-3)


@pytest.fixture(scope="module")
def trained():
    """T3 model (3 heads) fitted for 150 Adam steps to a V=32 first-order chain (2 successors
    per token), so the heads agree with head 1 often but not always."""
    docs = markov_corpus(32, n_docs=200, branching=2, order=1, seed=0)[0]
    rng = np.random.default_rng(0)
    model = multitoken_model(CFG, 3)
    params = init_mtp_params(CFG, 3, jax.random.key(0))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, tokens_BT):
        def loss(p):
            out = model.apply({"params": p}, tokens_BT)
            return multitoken_loss(out, tokens_BT, None, (1.0, 1.0, 1.0))[0]
        g = jax.grad(loss)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state

    state = opt.init(params)
    for _ in range(150):
        rows = [docs[i] for i in rng.integers(0, len(docs), 16)]
        starts = [int(rng.integers(0, len(d) - 32)) for d in rows]
        batch = np.stack([d[s:s + 32] for d, s in zip(rows, starts, strict=True)])
        params, state = step(params, state, jnp.asarray(batch, jnp.int32))
    return params


def test_tree_structure_and_mask_are_ancestors_plus_prefix():
    for tree in (Tree.product((3, 2)), SPARSE, Tree.chain(2)):
        # Independent construction: a node sees the nodes whose path is a prefix of its own.
        paths = [()] + list(tree.paths)
        want = np.array([[p[:len(q)] == q for q in paths] for p in paths])
        assert (tree.ancestors_NN == want).all()
        assert [paths[i] for i in tree.parent_N[1:]] == [p[:-1] for p in tree.paths]
        # Every node after its parent, so the mask is within the causal order.
        assert (tree.parent_N[1:] < np.arange(1, tree.size)).all()
        # The effective attention mask of a cached verify call: prefix slots that were
        # written, then the node's ancestors (itself included) among the block's slots.
        N, S, index = tree.size, 24, 9
        written = np.random.default_rng(1).random((2, S)) < 0.7
        written[:, index:] = False
        written[:, index:index + N] = True  # the block's own writes
        spec = cache_spec(jnp.asarray(written), jnp.int32(index), N)
        mask_BNN = jnp.broadcast_to(jnp.asarray(tree.ancestors_NN), (2, N, N))
        got = np.asarray(visible(spec) & call_mask(mask_BNN, jnp.int32(index), S))
        ref = np.zeros((2, N, S), bool)
        for b in range(2):
            for t in range(N):
                ref[b, t, :index] = written[b, :index]
                for j, q in enumerate(paths):
                    ref[b, t, index + j] = paths[t][:len(q)] == q
        assert (got == ref).all()
    assert Tree.product((4, 2)).size == 13 and Tree.product((4, 2)).describe() == "1+4+8 nodes"
    assert parse_tree("chain", 3) == Tree.chain(2) == parse_tree("1,1", 3)
    with pytest.raises(ValueError, match="heads"):
        parse_tree("2,2,2", 3)
    with pytest.raises(ValueError, match="parent"):
        Tree.from_paths([(0,), (1, 0)])


def test_tree_greedy_equals_plain_greedy_with_penalty_batch_and_one_compile(trained):
    """(Without the penalty: `test_tree_accepts_at_least_the_chain_and_sparse_trees_work`.)"""
    s = SamplingConfig(repetition_penalty=1.5)
    ref = generate(CFG, dense_params_of(trained), PROMPTS, 40, s).tokens
    tree = Tree.product((4, 2))
    _, step = verify_steps(CFG, 3, 1, s, tree)
    before = step._cache_size()
    res = generate_verify(CFG, trained, PROMPTS, 40, s, tree=tree)
    assert res.tokens == ref
    assert res.tokens_per_forward > 1.5
    assert step._cache_size() - before <= 1  # 40 tokens, the decode step compiled at most once
    one = generate_verify(CFG, trained, PROMPTS[1:2], 40, s, tree=tree)  # batch 1
    assert one.tokens == ref[1:2]


def test_tree_accepts_at_least_the_chain_and_sparse_trees_work(trained):
    ref = generate(CFG, dense_params_of(trained), PROMPTS, 48).tokens
    rate = {}
    for name, tree in (("chain", None), ("4,2", "4,2"), ("sparse", SPARSE)):
        res = generate_verify(CFG, trained, PROMPTS, 48, tree=tree)
        assert res.tokens == ref, name
        rate[name] = res.tokens_per_forward
    assert rate["4,2"] >= rate["chain"] and rate["sparse"] >= rate["chain"], rate
    assert rate["4,2"] > rate["chain"], rate  # the extra candidates are accepted sometimes


@jax.jit
def _prefill_cache(params, tokens_BT, seg_BT):
    cache = init_mtp_cache(CFG, 3, 1, tokens_BT.shape[1])
    return multitoken_model(CFG, 3).apply({"params": params}, tokens_BT, None, seg_BT, cache).cache


def _layers(cache, b):
    """Per layer (stem and heads): (written mask [S], K [S, ...], V [S, ...]) of row b."""
    out = []
    for part in (cache["layers"], cache["heads"]):
        w, k, v = (np.asarray(part[x]) for x in ("written", "k", "v"))
        w, k, v = w[..., b, :], k[..., b, :, :, :], v[..., b, :, :, :]
        out += list(zip(w.reshape(-1, w.shape[-1]), k.reshape(-1, *k.shape[-3:]),
                        v.reshape(-1, *v.shape[-3:]), strict=True))
    return out


def test_cache_after_tree_verify_equals_prefill_of_the_same_tokens(trained):
    """Only the accepted path's K/V stay, in consecutive slots (B = 1: no gaps at all), equal to
    a fresh prefill of prompt + output; subsequent logits then equal plain decoding's."""
    for prompts in ([PROMPTS[1]], PROMPTS[:3]):
        res = generate_verify(CFG, trained, prompts, 20, tree="4,2", return_cache=True)
        for b, (p, t) in enumerate(zip(prompts, res.tokens, strict=True)):
            ctx = p + t[:-1]  # the last emitted token is not in the cache yet
            tokens = np.zeros((1, 48), np.int32)
            tokens[0, :len(ctx)] = ctx
            seg = (np.arange(48) < len(ctx)).astype(np.int32)[None]
            full = _layers(_prefill_cache(trained, tokens, seg), 0)
            for (w, k, v), (rw, rk, rv) in zip(_layers(res.cache, b), full, strict=True):
                assert w.sum() >= len(ctx)
                m = len(ctx)
                assert np.allclose(k[w][:m], rk[rw], atol=1e-5)
                assert np.allclose(v[w][:m], rv[rw], atol=1e-5)
                if len(prompts) == 1:  # contiguous: the prompt's slots, then the path's
                    first = int(np.argmax(w))
                    assert w[first:first + int(w.sum())].all()


def test_tree_sampling_keeps_head1_distribution(untrained):
    """3,000 rows through a 1+3+6 tree with random heads: the 2nd and 3rd tokens follow head
    1's exact marginals (chi-square), while the drafting head's own distribution is rejected."""
    params = untrained  # random heads: candidates disagree with head 1 often
    s = SamplingConfig(temperature=1.0)
    prompt, B = [4, 9, 2], 3000
    res = generate_verify(CFG, params, [prompt] * B, 3, s, seed=11, tree="3,2")
    toks = np.array(res.tokens)
    # both acceptance and the residual are used at both depths
    assert (res.accepted > 30).all() and (res.reached - res.accepted > 30).all()
    dense = dense_params_of(params)
    probs = lambda seqs: np.asarray(jax.nn.softmax(
        build(CFG).apply({"params": dense}, jnp.asarray(seqs)).logits[:, -1], -1), np.float64)
    p1 = probs([prompt])[0]
    p2_given = probs([prompt + [a] for a in range(V)])
    p3_given = probs([prompt + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    joint12 = p1[:, None] * p2_given
    marg2, marg3 = joint12.sum(0), np.einsum("ab,abc->c", joint12, p3_given)
    for j, marg in ((1, marg2), (2, marg3)):
        ok, stat, crit = chi2_ok(np.bincount(toks[:, j], minlength=V), marg)
        assert ok, (j, stat, crit)
    out = multitoken_model(CFG, 3).apply({"params": params}, jnp.asarray([prompt]))
    q2 = np.asarray(jax.nn.softmax(all_logits(out)[1, 0, -1]), np.float64)
    assert not chi2_ok(np.bincount(toks[:, 1], minlength=V), q2)[0]

"""Static candidate trees for tree verification of the multi-token heads.

The idea is Medusa's (Cai et al., 2024) and EAGLE's (Li et al., 2024): instead of one chain of
drafts, one forward pass checks a small tree of candidates under a tree attention mask. Node 0
(the root) is the certain token c = x_{p+1}; a node at depth d >= 1 is a candidate for
x_{p+1+d} drafted by head d+1, named by its *rank path* (r_1, ..., r_d): under greedy decoding
the node's token is head d+1's r_d-th best token (Medusa's "choices"); under sampling each node
draws its own token from head d+1 (`jaxdyn.multitoken.decode`).

A tree is a static structure (fixed node count and order), so the verify step compiles once.
Nodes are in topological order (depth, then rank path): every ancestor precedes its
descendants, which makes the ancestor mask lower-triangular (compatible with causal order).
A chain (`Tree.chain(d)`) is the degenerate tree with branching 1.

Dimension legend: N nodes, C most children of one node.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tree:
    """Non-root nodes as rank paths, in topological order (use the constructors)."""

    paths: tuple[tuple[int, ...], ...]

    @staticmethod
    def from_paths(paths: Iterable[Sequence[int]]) -> Tree:
        """A tree from rank paths (Medusa-style choices); every prefix of a path must be a node."""
        ps = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        have = set(ps)
        for p in ps:
            if not p or min(p) < 0:
                raise ValueError(f"tree path {p} must be a non-empty tuple of ranks >= 0")
            if len(p) > 1 and p[:-1] not in have:
                raise ValueError(f"tree path {p} has no parent {p[:-1]} in the tree")
        if not ps:
            raise ValueError("a verify tree needs at least one draft node")
        return Tree(tuple(ps))

    @staticmethod
    def chain(depth: int) -> Tree:
        """The single-chain verify: each head's best draft under the previous one."""
        return Tree.from_paths((0,) * d for d in range(1, depth + 1))

    @staticmethod
    def product(top_k: Sequence[int]) -> Tree:
        """Every combination of the top `top_k[d-1]` candidates at depth d (1 + k1 + k1·k2 …)."""
        if not top_k or min(top_k) < 1:
            raise ValueError(f"top_k per depth must be >= 1, got {tuple(top_k)}")
        return Tree.from_paths(p for d in range(1, len(top_k) + 1)
                               for p in itertools.product(*(range(k) for k in top_k[:d])))

    @property
    def size(self) -> int:
        """Nodes, root included (the block width of one verify forward)."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def top_k(self) -> int:
        """Most candidates any depth ranks (the top-k a greedy draft needs)."""
        return max(p[-1] for p in self.paths) + 1

    @functools.cached_property
    def parent_N(self) -> np.ndarray:
        """Parent node per node (-1 for the root)."""
        index = {(): 0, **{p: i + 1 for i, p in enumerate(self.paths)}}
        return np.array([-1] + [index[p[:-1]] for p in self.paths], np.int32)

    @functools.cached_property
    def depth_N(self) -> np.ndarray:
        return np.array([0] + [len(p) for p in self.paths], np.int32)

    @functools.cached_property
    def rank_N(self) -> np.ndarray:
        """Rank of each node's token among its head's candidates (0 for the root)."""
        return np.array([0] + [p[-1] for p in self.paths], np.int32)

    @functools.cached_property
    def ancestors_NN(self) -> np.ndarray:
        """[i, j]: node j is node i or one of its ancestors (the tree attention mask)."""
        anc = np.eye(self.size, dtype=bool)
        for i, par in enumerate(self.parent_N):  # parents come first: their rows are final
            if par >= 0:
                anc[i] |= anc[par]
        return anc

    @functools.cached_property
    def children_NC(self) -> np.ndarray:
        """Children of each node in rank order, padded with -1."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i, par in enumerate(self.parent_N):
            if par >= 0:
                kids[par].append(i)
        C = max(len(k) for k in kids)
        return np.array([k + [-1] * (C - len(k)) for k in kids], np.int32)

    def describe(self) -> str:
        """Nodes per depth, e.g. `1+4+8 nodes`."""
        per = np.bincount(self.depth_N)
        return "+".join(str(int(x)) for x in per) + " nodes"


def parse_tree(spec: str | None, n_heads: int) -> Tree:
    """`chain` (or None): one draft per head; `K1,K2,...`: the top-K_d of head d+1 under every
    node of depth d-1 (`Tree.product`); checked against the heads available."""
    if spec is None or spec == "chain":
        tree = Tree.chain(n_heads - 1)
    else:
        try:
            ks = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"verify tree {spec!r}: use 'chain' or top-k per depth such as "
                             "'4,2'") from None
        tree = Tree.product(ks)
    check_tree(tree, n_heads)
    return tree


def check_tree(tree: Tree, n_heads: int) -> None:
    if n_heads < 2:
        raise ValueError("verify mode needs a multi-token model (n_heads >= 2)")
    if tree.depth > n_heads - 1:
        raise ValueError(f"verify tree of depth {tree.depth} needs {tree.depth + 1} heads; the "
                         f"model has {n_heads}")

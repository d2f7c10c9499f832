"""TCG-Synth records as static-shape batches: prompts, answers and fixed-layout graphs.

Records (docs/features/temporal.md) are tokenised as "Question: … Answer: <answer>\\n" by the
run's tokenizer (`tok`: the syllable one by default, an imported backbone's own otherwise;
`jaxdyn.temporal.tokens`) and batched with their graphs into fixed-layout padded
`jraph.GraphsTuple`s (static N_max, E_max: one compile). `RecordIterator` serves the rows of a
process in a fresh order per epoch, resumably; `pretrain_arrays` / `renamed_text` make the
plain-text batches a backbone is pretrained on.

Dimension legend: B batch, T length, A answer slots, N N_max, E E_max, Ln name length.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import datasets
import jraph
import numpy as np

from jaxdyn.data.tokenizer import Tokenizer
from jaxdyn.temporal.encoders import OPEN_END, years_to_tau
from jaxdyn.temporal.synth import features
from jaxdyn.temporal.tokens import resolve
from jaxdyn.temporal.world import RELS, TYPES, make_names, t_years

PAD = 0
DAY_TAU = 1.0 / 3652.5  # one day in τ units


def prompt_text(rec: dict, date_in_prompt: bool = False) -> str:
    """The prompt; the date-in-prompt baseline (Dhingra et al. 2022) prefixes the date."""
    pre = f"Date: {rec['time']}. " if date_in_prompt else ""
    return f"{pre}Question: {rec['question']} Answer:"


def answer_text(answer: str) -> str:
    """What follows the prompt: a space, the answer, and "\\n" as the end marker."""
    return f" {answer}\n"


def tokenize(text: str, tok: Tokenizer | None = None) -> list[int]:
    """Ids of `text` by `tok` (no special tokens); None: the syllable tokenizer."""
    return resolve(tok).encode(text)


def load_split(path: str, cache_dir: str | None = None) -> list[dict]:
    """One JSONL split through HF `datasets` (explicit features: nulls never break typing)."""
    ds = datasets.load_dataset("json", data_files=path, split="train", features=features(),
                               cache_dir=cache_dir)
    recs = ds.to_list()
    # pyarrow's JSON reader infers timestamps for ISO dates before the cast to string, which
    # appends " 00:00:00": cut every date back to YYYY-MM-DD.
    day = lambda x: None if x is None else x[:10]
    for r in recs:
        r["time"], r["regime"] = day(r["time"]), [day(x) for x in r["regime"]]
        for e in r["graph"]["edges"]:
            e["valid_from"], e["valid_to"] = day(e["valid_from"]), day(e["valid_to"])
    return recs


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static shapes of a batch: one compile per preset."""

    seq_len: int = 128  # T
    ans_len: int = 12  # A
    n_max: int = 64  # N_max
    e_max: int = 256  # E_max
    name_len: int = 12  # Ln


def _tau(date: str | None) -> float:
    return OPEN_END if date is None else float(years_to_tau(t_years(date)))


def empty_graph_arrays(n: int, sh: Shapes) -> dict[str, np.ndarray]:
    N, E = sh.n_max, sh.e_max
    return {"tau": np.zeros(n, np.float32),
            "n_tokens": np.zeros((n, N, sh.name_len), np.int32),
            "n_tok_mask": np.zeros((n, N, sh.name_len), np.float32),
            "n_type": np.zeros((n, N), np.int32), "n_mask": np.zeros((n, N), np.float32),
            "n_query": np.zeros((n, N), np.int32), "n_entity": np.zeros((n, N), np.int32),
            "e_weight": np.zeros((n, E), np.float32), "e_from": np.zeros((n, E), np.float32),
            "e_to": np.full((n, E), OPEN_END, np.float32), "e_rel": np.zeros((n, E), np.int32),
            "e_mask": np.zeros((n, E), np.float32),
            # A padded edge points from the example's last slot to itself (weight 0, mask 0).
            "e_snd": np.full((n, E), N - 1, np.int32), "e_rcv": np.full((n, E), N - 1, np.int32)}


def fill_graph(out: dict, i: int, graph: dict, query_nodes: list[str], date: str,
               sh: Shapes, tok: Tokenizer | None = None) -> None:
    """Write one record graph (record schema) into row i of the padded arrays; node names
    are " <name>" encoded by `tok` (None: the syllable tokenizer), cut to `name_len`."""
    tok = resolve(tok)
    nodes, edges = graph["nodes"], graph["edges"]
    if len(nodes) > sh.n_max or len(edges) > sh.e_max:
        raise ValueError(f"graph with {len(nodes)} nodes / {len(edges)} edges exceeds "
                         f"N_max={sh.n_max} / E_max={sh.e_max}")
    out["tau"][i] = _tau(date)
    slot = {nd["id"]: k for k, nd in enumerate(nodes)}
    role = {q: (1 if j == 0 else 2) for j, q in enumerate(query_nodes)}
    for k, nd in enumerate(nodes):
        b = tok.encode(" " + nd["name"])[:sh.name_len]
        out["n_tokens"][i, k, :len(b)] = b
        out["n_tok_mask"][i, k, :len(b)] = 1
        out["n_type"][i, k] = TYPES.index(nd["type"])
        out["n_mask"][i, k] = 1
        out["n_query"][i, k] = role.get(nd["id"], 0)
        out["n_entity"][i, k] = zlib.crc32(nd["id"].encode()) & 0x7FFFFFFF
    for k, e in enumerate(edges):
        out["e_weight"][i, k], out["e_rel"][i, k] = e["weight"], RELS.index(e["rel"])
        out["e_from"][i, k], out["e_to"][i, k] = _tau(e["valid_from"]), _tau(e["valid_to"])
        out["e_mask"][i, k] = 1
        out["e_snd"][i, k], out["e_rcv"][i, k] = slot[e["src"]], slot[e["dst"]]


def encode(recs: list[dict], sh: Shapes, date_in_prompt: bool = False,
           answers: list[str] | None = None,
           tok: Tokenizer | None = None) -> dict[str, np.ndarray]:
    """Numpy arrays per example; `answers` overrides each record's answer (candidate scoring).
    Prompt and answer are encoded apart by `tok` (None: the syllable tokenizer) and joined,
    so the answer's ids are the same whatever precedes them."""
    tok, n = resolve(tok), len(recs)
    out = {"tokens": np.zeros((n, sh.seq_len), np.int32),
           "ans_pos": np.zeros((n, sh.ans_len), np.int32),
           "ans_tok": np.zeros((n, sh.ans_len), np.int32),
           "ans_mask": np.zeros((n, sh.ans_len), np.float32),
           "regime": np.zeros((n, 2), np.float32), **empty_graph_arrays(n, sh)}
    for i, r in enumerate(recs):
        p = tok.encode(prompt_text(r, date_in_prompt))
        a = tok.encode(answer_text(r["answer"] if answers is None else answers[i]))
        if len(p) + len(a) > sh.seq_len or len(a) > sh.ans_len:
            raise ValueError(f"record {r['id']}: {len(p)}+{len(a)} tokens exceed seq_len="
                             f"{sh.seq_len} or ans_len={sh.ans_len}; raise the preset's Shapes")
        out["tokens"][i, :len(p) + len(a)] = p + a
        out["ans_pos"][i, :len(a)] = np.arange(len(p) - 1, len(p) + len(a) - 1)
        out["ans_tok"][i, :len(a)] = a
        out["ans_mask"][i, :len(a)] = 1
        out["regime"][i] = [_tau(r["regime"][0]), _tau(r["regime"][1])]
        fill_graph(out, i, r["graph"], r["query_nodes"], r["time"], sh, tok)
    return out


def make_graph(arr: dict, tau_B=None) -> jraph.GraphsTuple:
    """Fixed layout: example b owns node slots [b·N, (b+1)·N) and edge slots [b·E, (b+1)·E).
    Works on numpy arrays (host) and on traced arrays inside `jit` alike."""
    B, N = arr["n_mask"].shape
    E = arr["e_mask"].shape[1]
    off = (np.arange(B, dtype=np.int32) * N)[:, None]
    flat = lambda x: x.reshape((B * x.shape[1],) + x.shape[2:])
    nodes = {"tokens": flat(arr["n_tokens"]), "tok_mask": flat(arr["n_tok_mask"]),
             "type": flat(arr["n_type"]), "mask": flat(arr["n_mask"]),
             "query": flat(arr["n_query"]), "entity": flat(arr["n_entity"])}
    edges = {"weight": flat(arr["e_weight"]), "from": flat(arr["e_from"]),
             "to": flat(arr["e_to"]), "rel": flat(arr["e_rel"]), "mask": flat(arr["e_mask"])}
    return jraph.GraphsTuple(
        nodes=nodes, edges=edges, senders=flat(arr["e_snd"] + off),
        receivers=flat(arr["e_rcv"] + off), n_node=np.full(B, N, np.int32),
        n_edge=np.full(B, E, np.int32),
        globals={"tau": (arr["tau"] if tau_B is None else tau_B).astype(np.float32)})


def take(arr: dict, idx) -> dict:
    return {k: v[idx] for k, v in arr.items()}


GRAPH_KEYS = ("tau", "n_tokens", "n_tok_mask", "n_type", "n_mask", "n_query", "n_entity",
              "e_weight", "e_from", "e_to", "e_rel", "e_mask", "e_snd", "e_rcv")


def renamed_text(rec: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, answer) text of the record with its query entities given fresh names."""
    names = {n["id"]: n["name"] for n in rec["graph"]["nodes"]}
    old = [names[q] for q in rec["query_nodes"]]
    table = dict(zip(old, make_names(rng, len(old)), strict=True))
    pat = re.compile(r"\b(" + "|".join(map(re.escape, old)) + r")\b")
    sub = lambda text: pat.sub(lambda m: table[m.group(1)], text)
    return sub(prompt_text(rec)), sub(answer_text(rec["answer"]))


def pretrain_arrays(pairs: list[tuple[str, str]], seq_len: int, prompt_weight: float,
                    tok: Tokenizer | None = None) -> dict[str, np.ndarray]:
    """`tokens` [n, T] and `weights` [n, T]: the loss weight of the target token t (predicted
    at t-1): 1 for answer tokens, `prompt_weight` for prompt tokens, 0 for padding and t = 0.
    Prompt and answer are encoded apart by `tok` and joined, as `encode` does."""
    tok = resolve(tok)
    toks = np.zeros((len(pairs), seq_len), np.int32)
    wts = np.zeros((len(pairs), seq_len), np.float32)
    for i, (prompt, answer) in enumerate(pairs):
        p = tok.encode(prompt)
        n_p, b = len(p), (p + tok.encode(answer))[:seq_len]
        toks[i, :len(b)] = b
        wts[i, 1:len(b)] = prompt_weight
        wts[i, n_p:len(b)] = 1.0
    return {"tokens": toks, "weights": wts}


class RecordIterator:
    """Infinite iterator of `rows`-row batches of this process's examples (index %
    process_count == process_index), in a fresh order per epoch drawn from (seed, epoch).

    `arrays(epoch)` gives the examples of an epoch as {name: [n, ...]} (the same n every
    epoch; it may change their content, e.g. fresh names). `state()` / `restore()` make it
    resumable like the text iterator.
    """

    def __init__(self, arrays, n: int, rows: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        self.arrays, self.rows, self.seed = arrays, rows, int(seed)
        self.local = np.arange(process_index, n, process_count)
        if len(self.local) < rows:
            raise ValueError(f"{len(self.local)} examples on process {process_index} are fewer "
                             f"than the {rows} rows of a batch; generate more records")
        self._epoch, self._index, self._cached = 0, 0, (-1, None)

    def _epoch_data(self):
        if self._cached[0] != self._epoch:
            order = np.random.default_rng((self.seed, self._epoch)).permutation(self.local)
            self._cached = (self._epoch, (order, self.arrays(self._epoch)))
        return self._cached[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index + self.rows > len(self.local):  # the rest of an epoch is dropped
            self._epoch, self._index = self._epoch + 1, 0
        order, arrays = self._epoch_data()
        idx = order[self._index:self._index + self.rows]
        self._index += self.rows
        return take(arrays, idx)

    def state(self) -> dict:
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict) -> list[str]:
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        return []


def fixed_batches(arrays: dict[str, np.ndarray], rows: int, max_batches: int,
                  process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Consecutive `rows`-row batches (the last one padded by repeating its final row; its
    padding rows weigh 0 through `ans_mask`/`weights`), this process's rows of each."""
    n = len(next(iter(arrays.values())))
    out = []
    for s in range(0, n, rows):
        idx = np.arange(s, min(s + rows, n))
        pad = np.full(rows - len(idx), idx[-1])
        b = take(arrays, np.concatenate([idx, pad]))
        for k in ("ans_mask", "weights"):
            if k in b and len(pad):
                b[k] = b[k].copy()
                b[k][len(idx):] = 0
        local = rows // process_count
        out.append(take(b, slice(process_index * local, (process_index + 1) * local)))
        if max_batches and len(out) >= max_batches:
            break
    return out

"""TCG-Synth world: entities, time-scoped edge rows and the answers they imply
(docs/features/temporal.md).

Days are proleptic ordinals; an edge row is {src, dst, rel, weight, from, to} with `to` None for
an open end. `answer_at` computes F1 (who leads), F2 (≤2-hop max-product supply shock) and F3
(active suppliers) at a day from the rows alone, so every record's answer can be recomputed.
`jaxdyn.temporal.synth` builds records and splits on top of this.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict

import numpy as np

RELS = ("leads", "hq_in", "supplies", "belongs_to")
TYPES = ("company", "person", "city", "sector")
PREFIX = {"company": "c", "person": "p", "city": "l", "sector": "s"}  # node id prefixes
SPLITS = ("train", "validation", "test_id", "test_future", "test_edited_graph",
          "test_unseen_entities")
D0 = dt.date(2000, 1, 1).toordinal()  # timeline start (inclusive)
D1 = dt.date(2031, 1, 1).toordinal()  # timeline end (exclusive): last day 2030-12-31
Y2018, Y2021 = dt.date(2018, 1, 1).toordinal(), dt.date(2021, 1, 1).toordinal()
SPLIT_DAYS = {"train": (D0, Y2018), "validation": (Y2018, Y2021), "test_id": (D0, Y2018),
              "test_future": (Y2021, D1), "test_edited_graph": (D0, Y2018),
              "test_unseen_entities": (D0, Y2018)}
TEMPLATES = {
    "F1": ("Who leads {x}: {a}, {b} or {c}?", "Who is the head of {x}: {a}, {b} or {c}?",
           "Which of {a}, {b}, {c} runs {x}?"),
    "F2": ("A disruption hits {x}. Which of {a}, {b}, {c}, {d} is hit hardest?",
           "{x} fails. Who suffers most: {a}, {b}, {c} or {d}?",
           "A shock at {x} spreads. Which of {a}, {b}, {c}, {d} is hit most?"),
    "F3": ("How many active suppliers does {x} have?", "How many firms supply {x} now?",
           "Count the active suppliers of {x}."),
}
WEIGHTS = (0.2, 0.4, 0.6, 0.8, 1.0)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """World and split sizes; the defaults are the design's (docs/features/temporal.md)."""

    n_companies: int = 200
    n_people: int = 400
    n_cities: int = 100
    n_sectors: int = 50
    n_train: int = 50_000
    n_eval: int = 5_000  # per evaluation split
    n_max: int = 64  # node cap per record graph
    e_max: int = 256  # edge cap per record graph
    family_mix: tuple[float, float, float, float] = (0.35, 0.35, 0.15, 0.15)  # F1..F4
    seed: int = 0  # numpy default_rng seed of the generator
    data_dir: str = ""  # read the splits from here (JSONL); "" = generate them in memory


def to_date(day: int) -> str:
    return dt.date.fromordinal(int(day)).isoformat()


def to_day(date: str) -> int:
    return dt.date.fromisoformat(date).toordinal()


def t_years(date: str) -> float:
    """year + (day_of_year − 1)/days_in_year (docs/features/temporal.md)."""
    d = dt.date.fromisoformat(date)
    n = (dt.date(d.year + 1, 1, 1) - dt.date(d.year, 1, 1)).days
    return d.year + (d.timetuple().tm_yday - 1) / n


CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
CODAS = ("", "", "", "n", "r", "s", "l", "x")  # repeated "" makes open syllables likelier


def make_names(rng: np.random.Generator, n: int) -> list[str]:
    """Unique pronounceable names from a 2–3 syllable CV(C) grammar."""
    cons, vows, codas = CONSONANTS, VOWELS, CODAS
    out, seen = [], set()
    while len(out) < n:
        syl = [cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))]
               + codas[rng.integers(len(codas))] for _ in range(rng.integers(2, 4))]
        name = "".join(syl).capitalize()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _cuts(rng, k: int, lo: int = D0, hi: int = D1, gap: int = 120) -> list[int]:
    """k sorted change points in (lo, hi), at least `gap` days apart and from the ends."""
    while True:
        c = np.sort(rng.integers(lo + gap, hi - gap, size=k))
        if k == 0 or np.all(np.diff(np.concatenate([[lo], c, [hi]])) >= gap):
            return [int(x) for x in c]


def edge(src, dst, rel, w, a, b):
    return {"src": src, "dst": dst, "rel": rel, "weight": float(w), "from": int(a),
            "to": None if b is None or b >= D1 else int(b)}


def make_world(rng: np.random.Generator, sc: SynthConfig, names: list[str]) -> dict:
    """Entities and time-scoped edge rows (days as ordinals; `to` None = open end)."""
    counts = (sc.n_companies, sc.n_people, sc.n_cities, sc.n_sectors)
    nodes, it = {}, iter(names)
    for t, n in zip(TYPES, counts, strict=True):
        for i in range(n):
            nodes[f"{PREFIX[t]}{i}"] = {"id": f"{PREFIX[t]}{i}", "name": next(it), "type": t}
    comps = [f"c{i}" for i in range(sc.n_companies)]
    edges = []
    for c in comps:
        cuts = _cuts(rng, int(rng.integers(2, 7)), gap=180)
        people = rng.choice(sc.n_people, size=len(cuts) + 1, replace=False)
        for p, a, b in zip(people, [D0] + cuts, cuts + [D1], strict=True):
            edges.append(edge(f"p{p}", c, "leads", 1.0, a, b))
        cuts = _cuts(rng, int(rng.integers(0, 3)), gap=365)
        cities = rng.choice(sc.n_cities, size=len(cuts) + 1, replace=False)
        for ci, a, b in zip(cities, [D0] + cuts, cuts + [D1], strict=True):
            edges.append(edge(c, f"l{ci}", "hq_in", 1.0, a, b))
        edges.append(edge(c, f"s{rng.integers(sc.n_sectors)}", "belongs_to", 1.0, D0, D1))
        others = [x for x in comps if x != c]
        for s in rng.choice(others, size=int(rng.integers(2, 6)), replace=False):
            m = int(rng.integers(1, 4))
            pts = _cuts(rng, 2 * m, gap=90)
            for a, b in zip(pts[0::2], pts[1::2], strict=True):
                b = D1 if b == pts[-1] and rng.random() < 0.3 else b
                if rng.random() < 0.3 and b - a > 400:  # a weight change starts a new row
                    mid = int(rng.integers(a + 180, b - 180))
                    w1, w2 = rng.choice(WEIGHTS, size=2, replace=False)
                    edges += [edge(str(s), c, "supplies", w1, a, mid),
                              edge(str(s), c, "supplies", w2, mid, b)]
                else:
                    edges.append(edge(str(s), c, "supplies", rng.choice(WEIGHTS), a, b))
    return {"nodes": nodes, "edges": edges}


# ----------------------------------------------------------------------------- answers


def active(e: dict, day: int) -> bool:
    return e["from"] <= day and (e["to"] is None or day < e["to"])


def index_edges(edges: list[dict]) -> dict:
    """Adjacency by (rel, endpoint): out[(rel, src)] and inn[(rel, dst)] lists of rows."""
    out, inn = defaultdict(list), defaultdict(list)
    for e in edges:
        out[(e["rel"], e["src"])].append(e)
        inn[(e["rel"], e["dst"])].append(e)
    return {"out": out, "in": inn}


def leader(idx: dict, x: str, day: int) -> str | None:
    hits = [e["src"] for e in idx["in"][("leads", x)] if active(e, day)]
    return hits[0] if len(hits) == 1 else None


def strengths(idx: dict, x: str, day: int | None) -> dict[str, float]:
    """Max over ≤2-hop directed `supplies` paths from x of the product of weights.

    `day=None` treats every row as active (reachability over the whole timeline).
    """
    def nbrs(u):
        best = {}
        for e in idx["out"][("supplies", u)]:
            if e["dst"] != x and (day is None or active(e, day)):
                best[e["dst"]] = max(best.get(e["dst"], 0.0), e["weight"])
        return best

    s = dict(nbrs(x))
    for z, w1 in list(s.items()):
        for y, w2 in nbrs(z).items():
            if y != z:
                s[y] = max(s.get(y, 0.0), round(w1 * w2, 6))
    return s


def n_suppliers(idx: dict, x: str, day: int) -> int:
    return len({e["src"] for e in idx["in"][("supplies", x)] if active(e, day)})


def answer_at(idx: dict, fam: str, subj: str, cands: list[str], day: int,
              names: dict[str, str]) -> str | None:
    """The answer (a candidate's name or an integer string), None when undefined or tied."""
    if fam == "F1":
        who = leader(idx, subj, day)
        return names[who] if who in cands else None
    if fam == "F2":
        s = strengths(idx, subj, day)
        vals = sorted((s.get(c, 0.0) for c in cands), reverse=True)
        if vals[0] <= 0 or vals[0] == vals[1]:
            return None
        return names[max(cands, key=lambda c: s.get(c, 0.0))]
    return str(n_suppliers(idx, subj, day))


def record_edges(rec: dict) -> list[dict]:
    return [edge(e["src"], e["dst"], e["rel"], e["weight"], to_day(e["valid_from"]),
                 None if e["valid_to"] is None else to_day(e["valid_to"]))
            for e in rec["graph"]["edges"]]


def answer_from_record(rec: dict) -> str:
    """Recompute a record's answer from its own graph, time and query nodes."""
    idx = index_edges(record_edges(rec))
    names = {n["id"]: n["name"] for n in rec["graph"]["nodes"]}
    subj, cands = rec["query_nodes"][0], rec["query_nodes"][1:]
    ans = answer_at(idx, rec["base_family"], subj, cands, to_day(rec["time"]), names)
    if ans is None:
        raise ValueError(f"record {rec['id']} has no well-defined answer")
    return ans


def regime(edges: list[dict], day: int) -> tuple[int, int]:
    """Maximal [a, b) around `day` in which no edge of the graph switches on or off."""
    pts = sorted({e["from"] for e in edges} | {e["to"] for e in edges if e["to"] is not None})
    a = max([p for p in pts if p <= day] + [D0])
    b = min([p for p in pts if p > day] + [D1])
    return a, b

"""TCG-Synth: a synthetic time-scoped causal-graph QA benchmark (docs/features/temporal.md).

Every answer is computable from its record alone (`answer_from_record`), so the DYNAMO-style
temporal-causal adapters can be tested on data where the right answer is known. A world of
companies, people, cities and sectors carries time-scoped edges (`leads`, `hq_in`, `supplies`,
`belongs_to`); questions ask who leads a company (F1), which company a supply shock hits hardest
(F2, ≤2-hop max-product propagation), how many suppliers are active (F3), or the same at two
times (F4 pairs). Deterministic: numpy `default_rng(seed)`.

    python -m jaxdyn.temporal synth --out DIR --seed 0
"""


from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections import defaultdict

import numpy as np

from jaxdyn.temporal.world import (  # noqa: F401  (re-exported: the benchmark's API)
    CODAS,
    CONSONANTS,
    D0,
    D1,
    PREFIX,
    RELS,
    SPLIT_DAYS,
    SPLITS,
    TEMPLATES,
    TYPES,
    VOWELS,
    WEIGHTS,
    SynthConfig,
    active,
    answer_at,
    answer_from_record,
    edge,
    index_edges,
    leader,
    make_names,
    make_world,
    record_edges,
    regime,
    strengths,
    t_years,
    to_date,
    to_day,
)

# Smallest sizes the generator can draw a world and questions from (a company has up to 7
# leaders in turn, 3 headquarters and 5 suppliers among the other companies).
MIN_SIZES = {"n_companies": 6, "n_people": 7, "n_cities": 3, "n_sectors": 1, "n_train": 1,
             "n_eval": 1, "n_max": 1, "e_max": 1, "seed": 0}
OUTPUT_FILES = (*(f"{s}.jsonl" for s in SPLITS), "meta.json")


class SynthConfigError(ValueError):
    """A TCG-Synth size or setting the generator cannot use."""


class SynthOutputError(ValueError):
    """The output folder of `write` is refused (not empty, not a folder, foreign files)."""


def flag(name: str) -> str:
    """The command-line flag of a SynthConfig field (n_train -> --n-train)."""
    return "--" + name.replace("_", "-")


def check_config(sc: SynthConfig) -> None:
    """Refuse sizes the generator cannot use, naming the field and its flag."""
    for name, low in MIN_SIZES.items():
        v = getattr(sc, name)
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
            raise SynthConfigError(f"{flag(name)} {v!r} (synth.{name}): must be an integer "
                                   f">= {low}")
    mix = tuple(sc.family_mix)
    if len(mix) != 4 or not all(isinstance(x, int | float) and math.isfinite(x) and x >= 0
                                for x in mix) or abs(sum(mix) - 1.0) > 1e-6:
        raise SynthConfigError(f"synth.family_mix={mix!r}: must be 4 non-negative weights "
                               "(F1..F4) summing to 1")


# ----------------------------------------------------------------------------- records


def neighbourhood(widx: dict, query: list[str], essential: list[dict],
                  sc: SynthConfig) -> list[dict]:
    """≤2-hop neighbourhood of the query nodes over the whole timeline, capped.

    Essential rows (the answer's and distractors' evidence) always stay; the others are added
    in a deterministic order (hop, relation, ids, start) while the node and edge caps allow.
    """
    dist = {q: 0 for q in query}
    for hop in (1, 2):
        for u in [u for u, d in dist.items() if d == hop - 1]:
            for e in widx["by_node"][u]:
                for v in (e["src"], e["dst"]):
                    dist.setdefault(v, hop)
    keep = {id(e): e for e in essential}
    nodes = set(query) | {e["src"] for e in essential} | {e["dst"] for e in essential}
    rest = [e for u, d in dist.items() if d <= 1 for e in widx["by_node"][u]]
    rest.sort(key=lambda e: (min(dist[e["src"]], dist[e["dst"]]), RELS.index(e["rel"]),
                             e["src"], e["dst"], e["from"]))
    for e in rest:
        if len(keep) >= sc.e_max:
            break
        new = {e["src"], e["dst"]} - nodes
        if id(e) not in keep and len(nodes) + len(new) <= sc.n_max:
            keep[id(e)] = e
            nodes |= new
    return list(keep.values())


def essential_edges(widx: dict, fam: str, subj: str, cands: list[str]) -> list[dict]:
    if fam == "F1":
        return list(widx["in"][("leads", subj)])
    if fam == "F3":
        return list(widx["in"][("supplies", subj)])
    out = list(widx["out"][("supplies", subj)])
    for e in list(out):
        out += [f for f in widx["out"][("supplies", e["dst"])] if f["dst"] in cands]
    return [e for e in out if e["dst"] in cands or e["src"] == subj]


def build_record(world, widx, fam, base, subj, cands, day, sc, rng, split, rid,
                 pair_id=None) -> dict:
    names = {k: v["name"] for k, v in world["nodes"].items()}
    rows = neighbourhood(widx, [subj] + cands, essential_edges(widx, base, subj, cands), sc)
    ids = sorted({subj, *cands} | {e["src"] for e in rows} | {e["dst"] for e in rows})
    tmpl = TEMPLATES[base][rng.integers(3)]
    cn = [names[c] for c in cands]
    q = tmpl.format(x=names[subj], **dict(zip("abcd", cn, strict=False)))
    a, b = regime(rows, day)
    rec = {"id": rid, "family": fam, "base_family": base, "question": q, "time": to_date(day),
           "t_years": t_years(to_date(day)), "answer": "", "answer_aliases": [],
           "candidates": cn if base != "F3" else [str(i) for i in range(6)],
           "graph": {"nodes": [world["nodes"][i] for i in ids],
                     "edges": [{"src": e["src"], "dst": e["dst"], "rel": e["rel"],
                                "weight": e["weight"], "valid_from": to_date(e["from"]),
                                "valid_to": None if e["to"] is None else to_date(e["to"])}
                               for e in rows]},
           "query_nodes": [subj] + (cands if base != "F3" else []),
           "regime": [to_date(a), to_date(min(b, D1))], "split": split, "pair_id": pair_id}
    rec["answer"] = answer_from_record(rec)
    rec["answer_aliases"] = [rec["answer"]]
    return rec


def pick_question(world, widx, rng, base: str, day: int):
    """(subject, candidates) with a well-defined answer at `day`, or None."""
    comps = [k for k, v in world["nodes"].items() if v["type"] == "company"]
    x = comps[rng.integers(len(comps))]
    if base == "F1":
        people = sorted({e["src"] for e in widx["in"][("leads", x)]})
        who = leader(widx, x, day)
        if who is None:
            return None
        others = [p for p in people if p != who]
        cands = [who] + list(rng.choice(others, size=2, replace=False))
    elif base == "F2":
        ever, now = strengths(widx, x, None), strengths(widx, x, day)
        best = max(now.values(), default=0.0)
        top = [c for c, v in now.items() if v == best and best > 0]
        rest = [c for c in ever if now.get(c, 0.0) < best]
        if len(top) != 1 or len(rest) < 3:
            return None
        cands = top + list(rng.choice(sorted(rest), size=3, replace=False))
    else:
        cands = []
    rng.shuffle(cands)
    return x, [str(c) for c in cands]


def generate_split(world, split: str, n: int, sc: SynthConfig, rng, seen: set) -> list[dict]:
    """n records (F4 pairs count as two), times drawn uniformly in the split's day range."""
    lo, hi = SPLIT_DAYS[split]
    widx = index_edges(world["edges"])
    widx["by_node"] = defaultdict(list)
    for e in world["edges"]:
        widx["by_node"][e["src"]].append(e)
        widx["by_node"][e["dst"]].append(e)
    names = {k: v["name"] for k, v in world["nodes"].items()}
    recs: list[dict] = []
    while len(recs) < n:
        fam = ("F1", "F2", "F3", "F4")[rng.choice(4, p=np.asarray(sc.family_mix))]
        base = fam if fam != "F4" else ("F1", "F2", "F3")[rng.integers(3)]
        for _ in range(100):  # retry inside the family so the family mix holds
            day = int(rng.integers(lo, hi))
            got = pick_question(world, widx, rng, base, day)
            if got is not None:
                break
        else:
            raise SynthConfigError(f"could not draw a {base} question in 100 tries; the world "
                                   "is too small: raise --n-companies/--n-people/--n-cities")
        subj, cands = got
        rid = f"{split}-{len(recs):06d}"
        rec = build_record(world, widx, fam, base, subj, cands, day, sc, rng, split, rid)
        if (rec["question"], rec["time"]) in seen:
            continue
        if fam != "F4":
            recs.append(rec)
            seen.add((rec["question"], rec["time"]))
            continue
        # F4: the same question at a second time, inside (same) or across (differs) a regime.
        a, b = to_day(rec["regime"][0]), to_day(rec["regime"][1])
        same = rng.random() < 0.5
        if same:
            if b - a < 2:
                continue
            day2 = int(rng.integers(max(a, lo), min(b, hi)))  # non-empty: day is inside
        else:
            day2 = int(rng.integers(lo, hi))
        idx = index_edges(record_edges(rec))
        ans2 = answer_at(idx, base, subj, cands, day2, names)
        if ans2 is None or (ans2 == rec["answer"]) != same or day2 == day:
            continue
        rec["pair_id"] = f"{split}-pair-{len(recs):06d}"
        rec2 = json.loads(json.dumps(rec))
        rec2.update(id=f"{split}-{len(recs) + 1:06d}", time=to_date(day2),
                    t_years=t_years(to_date(day2)), answer=ans2, answer_aliases=[ans2])
        ra, rb = regime(record_edges(rec), day2)
        rec2["regime"] = [to_date(ra), to_date(rb)]
        recs += [rec, rec2]
        seen |= {(rec["question"], rec["time"]), (rec2["question"], rec2["time"])}
    return recs[:n]


def _edit_leads(rows: list[dict], subj: str, day: int, rng) -> list[dict] | None:
    """Move the boundary between the active `leads` row and a neighbour across t."""
    mine = sorted((e for e in rows if e["rel"] == "leads" and e["dst"] == subj),
                  key=lambda e: e["from"])
    i = next(k for k, e in enumerate(mine) if active(e, day))
    j = i - 1 if (rng.random() < 0.5 and i > 0) or i == len(mine) - 1 else i + 1
    first, second = (mine[j], mine[i]) if j < i else (mine[i], mine[j])
    lo, hi = first["from"] + 1, (second["to"] or D1) - 1
    cut = day + int(rng.integers(1, 60)) if j < i else day - int(rng.integers(0, 60))
    if not lo <= cut <= hi:
        return None
    first["to"], second["from"] = cut, cut
    return rows


def edit_record(rec: dict, rng, tries: int = 40) -> dict | None:
    """Move one interval boundary or change one weight so that the answer changes."""
    day = to_day(rec["time"])
    names = {n["id"]: n["name"] for n in rec["graph"]["nodes"]}
    subj, cands, fam = rec["query_nodes"][0], rec["query_nodes"][1:], rec["base_family"]
    for _ in range(tries):
        new = record_edges(rec)
        if fam == "F1":
            if _edit_leads(new, subj, day, rng) is None:
                continue
        else:
            pool = [e for e in new if e["rel"] == "supplies"]
            e = pool[rng.integers(len(pool))]
            shift = int(rng.integers(1, 60))
            if fam == "F2" and rng.random() < 0.5:
                e["weight"] = float(rng.choice([w for w in WEIGHTS if w != e["weight"]]))
            elif active(e, day):  # end it just before t, or start it just after t
                if day - shift > e["from"]:
                    e["to"] = day - shift + 1
                elif e["to"] is None or day + shift < e["to"]:
                    e["from"] = day + shift
            elif e["from"] > day:  # stretch an inactive row over t
                e["from"] = max(day - shift, D0)
            else:
                e["to"] = day + shift
        ans = answer_at(index_edges(new), fam, subj, cands, day, names)
        if ans is None or ans == rec["answer"]:
            continue
        out = json.loads(json.dumps(rec))
        out["graph"]["edges"] = [{"src": f["src"], "dst": f["dst"], "rel": f["rel"],
                                  "weight": f["weight"], "valid_from": to_date(f["from"]),
                                  "valid_to": None if f["to"] is None else to_date(f["to"])}
                                 for f in new]
        a, b = regime(new, day)
        out.update(answer=ans, answer_aliases=[ans], regime=[to_date(a), to_date(b)],
                   split="test_edited_graph", id=rec["id"].replace("test_id", "test_edited_graph"))
        return out
    return None


def generate(sc: SynthConfig, seed: int) -> dict[str, list[dict]]:
    """All six splits. The unseen-entity split lives in a second world with disjoint names."""
    check_config(dataclasses.replace(sc, seed=seed))
    rng = np.random.default_rng(seed)
    n_ent = sc.n_companies + sc.n_people + sc.n_cities + sc.n_sectors
    names = make_names(rng, 2 * n_ent)
    world, world_new = make_world(rng, sc, names[:n_ent]), make_world(rng, sc, names[n_ent:])
    seen: set = set()
    out = {s: generate_split(world, s, sc.n_train if s == "train" else sc.n_eval, sc, rng, seen)
           for s in ("train", "validation", "test_id", "test_future")}
    out["test_unseen_entities"] = generate_split(world_new, "test_unseen_entities", sc.n_eval,
                                                 sc, rng, set())
    pool = generate_split(world, "test_id", 2 * sc.n_eval, sc, rng, seen)
    edited = [r for r in (edit_record(r, rng) for r in pool if r["family"] != "F4") if r]
    out["test_edited_graph"] = edited[:sc.n_eval]
    return out


def features():
    """The record schema as HF `datasets.Features` (explicit, so all-null columns type right)."""
    import datasets as ds

    st = ds.Value("string")
    return ds.Features({
        "id": st, "family": st, "base_family": st, "question": st, "time": st,
        "t_years": ds.Value("float64"), "answer": st, "answer_aliases": ds.List(st),
        "candidates": ds.List(st),
        "graph": {"nodes": ds.List({"id": st, "name": st, "type": st}),
                  "edges": ds.List({"src": st, "dst": st, "rel": st,
                                    "weight": ds.Value("float64"), "valid_from": st,
                                    "valid_to": st})},
        "query_nodes": ds.List(st), "regime": ds.List(st), "split": st, "pair_id": st})


def write(out_dir: str, splits: dict[str, list[dict]], meta: dict, *,
          overwrite: bool = True) -> None:
    """The splits as `<split>.jsonl` plus `meta.json` in `out_dir`, whole or not at all.

    They are written to a temporary folder beside `out_dir` and renamed into place, so an
    error leaves no half-written split. An existing `out_dir` that is not empty is replaced
    only with `overwrite` (`--overwrite` on the command line) and only when it holds nothing
    but TCG-Synth files."""
    out = os.path.abspath(out_dir)
    check_output(out_dir, overwrite)
    parent = os.path.dirname(out)
    created = []  # parents this call makes, deepest first
    d = parent
    while not os.path.lexists(d):
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    tmp, old = None, None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
        for name, recs in splits.items():
            with open(os.path.join(tmp, f"{name}.jsonl"), "w") as f:
                for r in recs:
                    f.write(json.dumps(r, allow_nan=False) + "\n")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "counts": {k: len(v) for k, v in splits.items()}}, f, indent=2)
        check_output(out_dir, overwrite)  # again: it may have changed meanwhile
        if os.path.isdir(out) and os.listdir(out):  # allowed: checked just above
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, old)  # onto the empty folder just made
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
        else:
            os.rename(tmp, out)  # absent or empty
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.isdir(old) and not os.listdir(old):
            os.rmdir(old)  # made for the swap, which did not happen
        for d in created:
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(out_dir: str, overwrite: bool) -> None:
    """Refuse an `out_dir` that is a file, or not empty without `overwrite`, or holding files
    TCG-Synth does not write."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise SynthOutputError(f"--out {out_dir!r} exists and is not a folder; remove it or "
                               "choose another --out")
    entries = sorted(os.listdir(out_dir))
    if entries and not overwrite:
        raise SynthOutputError(f"--out {out_dir!r} exists and is not empty; choose a new "
                               "folder, or pass --overwrite to replace a previous TCG-Synth output")
    foreign = [e for e in entries if e not in OUTPUT_FILES]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise SynthOutputError(f"--out {out_dir!r} holds {', '.join(foreign[:5])}{more}, which "
                               "TCG-Synth does not write; move those away or choose a new folder")

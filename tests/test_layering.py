"""The package layering (docs/architecture.md) holds: imports only point down the layers, no
package of a layer imports another of the same layer, no import cycles, project modules are
imported at module top, library code parses no arguments and does not import `conversion`,
and nothing cites documents outside the repository."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower layers never import higher ones. Entry modules (`__main__`, `jaxdyn.generate`) are on
# top of everything; `jaxdyn` itself (its __init__) is the version string only.
LAYERS = {
    "jaxdyn": 0, "jaxdyn.config": 0, "jaxdyn.sharding": 0, "jaxdyn.distributed": 0,
    "jaxdyn.model": 1, "jaxdyn.data": 1,
    "jaxdyn.checkpoint": 2, "jaxdyn.decode": 2,
    "jaxdyn.multitoken": 3, "jaxdyn.temporal": 3,
    "jaxdyn.train": 4, "jaxdyn.evaluate": 4, "conversion": 4,
    "jaxdyn.experiments": 5, "jaxdyn.bench": 5, "jaxdyn.viz": 5,
    "jaxdyn.cli": 6,
}
ENTRY = 7
# Packages below the command line that may import `conversion` (the bench measures it).
CONVERSION_USERS = ("jaxdyn.cli", "jaxdyn.bench")
MAX_LOCAL_IMPORTS = 10  # function-local imports of project modules (the bound)


def modules() -> dict[str, Path]:
    out = {}
    for top in ("jaxdyn", "conversion"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODS = modules()


def owner(name: str) -> str:
    """The layer-table key of a module (its package: jaxdyn.model.routing.mod -> jaxdyn.model)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{name} is in no layer; add its package to LAYERS")


def layer(name: str) -> int:
    if name.endswith("__main__") or name == "jaxdyn.generate":
        return ENTRY
    return LAYERS[owner(name)]


def resolve(name: str) -> str | None:
    while name and name not in MODS:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str):
    """(imported project module, is function-local, line) for each import in `name`."""
    path = MODS[name]
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        hits = {t for t in map(resolve, targets) if t and t != name}
        for t in hits:
            yield t, node.col_offset > 0, node.lineno


def test_imports_point_down_the_layers():
    bad = []
    for name in MODS:
        for target, _, line in imports(name):
            up = layer(target) > layer(name)
            sideways = (layer(target) == layer(name) != ENTRY
                        and owner(target) != owner(name))
            if up or sideways:
                bad.append(f"{MODS[name].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {n: {t for t, _, _ in imports(n)} for n in MODS}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own children is not a cycle
            if len(comp) > 1 and not all(c.startswith(min(comp)) for c in comp):
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_project_modules_are_imported_at_module_top():
    local = [f"{MODS[n].relative_to(ROOT)}:{line} imports {t}"
             for n in MODS for t, is_local, line in imports(n) if is_local]
    assert len(local) <= MAX_LOCAL_IMPORTS, "\n".join(local)


def test_library_code_parses_no_arguments_and_leaves_conversion_to_the_commands():
    bad = []
    for name, path in MODS.items():
        if layer(name) == ENTRY or owner(name) in ("jaxdyn.cli", "conversion"):
            continue
        text = path.read_text()
        if re.search(r"^\s*import argparse|from argparse import", text, re.M):
            bad.append(f"{name} imports argparse")
        if not name.startswith(CONVERSION_USERS) and any(
                t == "conversion" or t.startswith("conversion.") for t, _, _ in imports(name)):
            bad.append(f"{name} imports conversion")
    assert not bad, bad


def test_nothing_cites_documents_outside_the_repository():
    outside = "shared"  # the folder beside the repository that holds the design drafts
    pattern = re.compile(rf"{outside}/spec|\.\./{outside}|\bspec §|spec, §|\(spec §")
    hits = []
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".ipynb", ".sbatch") or any(
                p in (".venv", ".git", "fixtures") for p in path.relative_to(ROOT).parts) or \
                path == Path(__file__):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits[:40]) + f"\n({len(hits)} lines)"

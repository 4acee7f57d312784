"""The import graph of keeper has no cycles, and migration never reaches into hostd.

Read from the source with `ast`, nothing imported: every `import keeper...` counts,
also under `if TYPE_CHECKING:` and inside functions, because a cycle hidden there is
still a knot in the design (and one refactor away from an ImportError at start-up).
Importing a module imports its packages too (`keeper.a.b` runs `keeper/a/__init__`).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported keeper module
    where: str  # "keeper/hostd/agent.py:44"
    how: str  # "", "TYPE_CHECKING", "in a function"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `root`, by dotted name."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement in the tree, with how it is reached."""
    found: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def walk(node: ast.AST, how: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = how
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = how or "in a function"
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    walk_one(stmt, how or "TYPE_CHECKING")
                for stmt in child.orelse:
                    walk_one(stmt, how)
                continue
            walk_one(child, inner)

    def walk_one(node: ast.AST, how: str) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, how))
        walk(node, how)

    walk(tree, "")
    return found


def graph(root: Path, package: str) -> tuple[dict[str, set[str]], list[Edge]]:
    mods = modules(root, package)
    edges: list[Edge] = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, how in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in node.names:  # `from keeper.migrate import mm_r` names a module
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for target in targets:
                # the module itself, else the deepest keeper package that exists
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if not target:
                    continue
                parts = target.split(".")
                # its packages run first, bar those the importer sits in (already running)
                hops = [h for h in (".".join(parts[:i]) for i in range(1, len(parts)))
                        if h in mods and not name.startswith(h + ".")]
                for hop in [*hops, target]:
                    if hop != name:
                        where = f"{path.relative_to(root)}:{node.lineno}"
                        edges.append(Edge(name, hop, where, how))
    adj: dict[str, set[str]] = {m: set() for m in mods}
    for e in edges:
        adj[e.source].add(e.target)
    return adj, edges


def strongly_connected(adj: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's SCCs with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(adj):
        if start in index:
            continue
        work = [(start, iter(sorted(adj[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adj[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    scc.append(top)
                    if top == node:
                        break
                if len(scc) > 1:
                    out.append(sorted(scc))
    return sorted(out)


def _path(adj: dict[str, set[str]], members: set[str], start: str, goal: str) -> list[str]:
    """A shortest import path start -> … -> goal inside one SCC (BFS)."""
    came: dict[str, str] = {start: start}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        if node == goal:
            path = [goal]
            while path[-1] != start:
                path.append(came[path[-1]])
            return path[::-1]
        for nxt in sorted(adj[node] & members):
            if nxt not in came:
                came[nxt] = node
                todo.append(nxt)
    raise AssertionError(f"no path {start} -> {goal}: not one SCC")


def cycles(adj: dict[str, set[str]], scc: list[str]) -> list[list[str]]:
    """For every import edge inside `scc`, the shortest cycle through it: together they
    cover every edge that would have to go to break the knot. Rotated to start at
    the smallest name, deduplicated."""
    members, found = set(scc), set()
    for source in scc:
        for target in sorted(adj[source] & members):
            ring = [source, *_path(adj, members, target, source)[:-1]]
            i = ring.index(min(ring))
            found.add(tuple(ring[i:] + ring[:i]))
    return [[*ring, ring[0]] for ring in sorted(found, key=lambda r: (len(r), r))]


def describe(adj: dict[str, set[str]], edges: list[Edge], sccs: list[list[str]]) -> str:
    lines = [f"{len(sccs)} knot(s) of import cycles in keeper:"]
    for scc in sccs:
        members = set(scc)
        lines.append("")
        lines.append(f"  {len(scc)} modules: {', '.join(scc)}")
        for ring in cycles(adj, scc):
            lines.append(f"    cycle: {' -> '.join(ring)}")
        lines.append("    the imports inside it:")
        for e in sorted({e for e in edges if e.source in members and e.target in members},
                        key=lambda e: (e.source, e.where, e.target)):
            note = f"  [{e.how}]" if e.how else ""
            lines.append(f"      {e.where:38} {e.source} -> {e.target}{note}")
    return "\n".join(lines)


def test_keeper_has_no_import_cycles() -> None:
    adj, edges = graph(ROOT, "keeper")
    assert len(adj) > 50 and edges  # the walk found the package
    sccs = strongly_connected(adj)
    assert not sccs, describe(adj, edges, sccs)


def test_migration_does_not_import_the_host_agent() -> None:
    _, edges = graph(ROOT, "keeper")
    bad = [e for e in edges if e.source.startswith("keeper.migrate")
           and (e.target == "keeper.hostd" or e.target.startswith("keeper.hostd."))]
    assert not bad, "keeper.migrate reaches into keeper.hostd:\n" + "\n".join(
        f"  {e.where:40} {e.source} -> {e.target}" + (f"  [{e.how}]" if e.how else "")
        for e in bad)


# -- the checker checks itself on a package made for it ---------------------------------


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_hidden_cycles_and_ignores_clean_imports(tmp_path: Path) -> None:
    _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\nimport os\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from pkg.c import thing\n"),
        "pkg/c.py": "def later():\n    from . import a\n",  # a -> b -> c -> a
        "pkg/sub/__init__.py": "from pkg.sub.leaf import x\n",
        "pkg/sub/leaf.py": "x = 1\n",  # package -> its own module: no cycle
        "pkg/d.py": "import pkg.sub.leaf\nfrom .sub import leaf\n",
        "pkg/e.py": "from pkg import f\n",
        "pkg/f.py": "import typing\nif typing.TYPE_CHECKING:\n    import pkg.e\n",  # e <-> f
    })
    adj, edges = graph(tmp_path, "pkg")
    assert adj["pkg.d"] == {"pkg.sub", "pkg.sub.leaf"} and adj["pkg.sub"] == {"pkg.sub.leaf"}
    sccs = strongly_connected(adj)
    assert sccs == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.e", "pkg.f"]]
    text = describe(adj, edges, sccs)
    assert cycles(adj, sccs[0]) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert "cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a" in text
    assert "pkg/b.py:3" in text and "[TYPE_CHECKING]" in text and "[in a function]" in text


@pytest.mark.parametrize("deep", [2000])
def test_the_checker_needs_no_recursion(deep: int) -> None:
    adj = {f"m{i}": {f"m{i + 1}"} for i in range(deep)}
    adj[f"m{deep}"] = {"m0"}
    (scc,) = strongly_connected(adj)
    assert len(scc) == deep + 1

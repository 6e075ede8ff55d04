"""Architecture checks: light imports, no import cycles, a curated public API.

The import graph is read from the source (AST of every module of the package, imports inside
functions included, relative imports resolved), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import clustermass

SRC = Path(clustermass.__file__).resolve().parent
PKG = "clustermass"


# ---------------------------------------------------------------------- import weight
def test_light_modules_import_neither_torch_nor_matplotlib():
    code = (
        "import sys, clustermass, clustermass.phasespace, clustermass.posterior, clustermass.cosmology\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', 'lightning'})\n"
        "assert not heavy, heavy\n"
        # the lazy names resolve (and only then load what they need)
        "from clustermass import Catalogue, RunConfig, load_config, read_catalogue, write_catalogue\n"
        "assert 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_no_module_selects_a_matplotlib_backend():
    """Only plots/ imports matplotlib, never pyplot and never ``matplotlib.use``."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "matplotlib.use(" not in text, path
        assert "import matplotlib.pyplot" not in text or path.name == "_io.py", path
        if "matplotlib" in text and path.parent.name != "plots":
            tree = ast.parse(text)
            mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(m.startswith("matplotlib") for m in mods) or path.name == "_io.py", path


# ---------------------------------------------------------------------- import graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """The package module an import of ``name`` loads (the longest known prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges() -> list[tuple[str, str, str, int]]:
    """``(importer, imported, name, line)`` for every import of a package module by another."""
    edges = []
    for mod, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, mod, is_pkg)
                # ``from pkg import sub`` imports the submodule pkg.sub; otherwise an attribute of pkg
                targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, a.name)
                           for a in node.names]
            else:
                continue
            for target, name in targets:
                known = _known(target) if target.split(".")[0] == PKG else None
                if known and known != mod:
                    edges.append((mod, known, name, node.lineno))
    return edges


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _name, _ in import_edges():
        if b == PKG:
            continue  # the root facade: checked by test_submodules_take_only_the_version_from_the_root
        graph[a].add(b)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_lazy_and_relative_imports():
    edges = {(a, b) for a, b, _, _ in import_edges()}
    assert ("clustermass.evaluation", "clustermass.plots.evaluation") in edges  # inside a function
    assert ("clustermass.simulate.box", "clustermass.cosmology") in edges  # `from .. import cosmology`
    assert ("clustermass.datasets", "clustermass.phasespace") in edges
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_package_modules():
    cycles = find_cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_submodules_take_only_the_version_from_the_root():
    """Importing a submodule always initialises ``clustermass/__init__`` first; the facade may
    name any submodule lazily, so submodules may take nothing from it but ``__version__``."""
    bad = [(a, name, line) for a, b, name, line in import_edges() if b == PKG and name != "__version__"]
    assert not bad, bad


def test_plots_draw_what_they_are_given():
    """``clustermass.plots`` imports no pipeline stage (only _io and, for a constant formula, baselines)."""
    allowed = {"clustermass._io", "clustermass.plots", "clustermass.baselines"}
    bad = [(a, b, line) for a, b, _, line in import_edges() if a.startswith("clustermass.plots") and b not in allowed]
    assert not bad, bad


# ---------------------------------------------------------------------- public API
def test_public_api_is_curated_and_resolves():
    names = clustermass.__all__
    assert len(names) == len(set(names)) and set(names) == {"__version__", *clustermass._LAZY}
    for name in names:
        value = getattr(clustermass, name)
        if name != "__version__":  # defined in the module it is documented in, not re-wrapped
            assert value.__module__.startswith("clustermass."), name
    assert set(names) <= set(dir(clustermass))
    with pytest.raises(AttributeError):
        clustermass.no_such_name  # noqa: B018


def test_import_clustermass_loads_no_dependency():
    code = (
        "import sys, clustermass\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'pandas', 'pydantic', 'torch'})\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_long_modules_are_explained_in_design_notes():
    """No module above ~600 lines without a reason in docs/design.md ("Modules above ~600 lines")."""
    design = (SRC.parents[1] / "docs" / "design.md").read_text()
    start = design.index("Modules above ~600 lines")
    reasons = design[start:design.index("\n- ", start)]
    long = [p for p in SRC.rglob("*.py") if len(p.read_text().splitlines()) > 650]
    missing = [str(p.relative_to(SRC)) for p in long if f"`{p.stem}`" not in reasons]
    assert not missing, f"modules above 650 lines without a reason in docs/design.md: {missing}"

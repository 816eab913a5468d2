"""The project's import graph, read from the source (every import statement, module level or deferred), for the
architecture tests: which module imports which, each module's layer, and the import cycles."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# repo folder -> installed package (pyproject.toml's package-dir)
PACKAGES = {"prefixflow": "prefixflow", "flows": "prefixflow.flows", "tasks": "prefixflow.tasks",
            "infra": "prefixflow.infra", "prefix_core": "prefix_core"}
# top to bottom: a module may import its own package and anything below its layer, nothing above or beside it
LAYERS = [("prefixflow.cli",), ("prefixflow.flows",), ("prefixflow.serving", "prefixflow.tasks"),
          ("prefixflow.launch",), ("prefixflow.services",), ("prefixflow.settings", "prefixflow.processes"),
          ("prefix_core",)]
# infra (service launchers) sits beside the pipeline: only the CLI imports it, and it imports only these
INFRA = "prefixflow.infra"
INFRA_MAY_IMPORT = ("prefixflow.settings", "prefixflow.processes", "prefixflow.services.spec",
                    "prefixflow.services.errors", "prefix_core.files", "prefix_core.errors", "prefix_core.config",
                    "prefix_core.template")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported project module (the deepest one that exists)
    line: int
    deferred: bool  # inside a function or class body, not at module level


def modules() -> dict[str, Path]:
    """Every project module: dotted name -> file."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports() -> list[Import]:
    """Every import of a project module by a project module."""
    known = modules()
    out = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" for a in node.names] or [base]
            for name in names:
                target = _resolve(name, known)
                if target is not None and target != module:
                    deferred = id(node) not in top and not _in_type_checking(tree, node)
                    out.append(Import(module, target, node.lineno, deferred))
    return out


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test) \
                and any(child is node for child in ast.walk(stmt)):
            return True
    return False


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer(module: str) -> int | None:
    """The index in LAYERS of a module (None for infra and the bare ``prefixflow`` package)."""
    for i, prefixes in enumerate(LAYERS):
        if any(_under(module, p) for p in prefixes):
            return i
    return None


def package_of(module: str) -> str:
    for prefixes in LAYERS:
        for p in prefixes:
            if _under(module, p):
                return p
    return INFRA if _under(module, INFRA) else module


def violations() -> list[str]:
    """Imports against the layer order, or into or out of infra beyond what it may."""
    bad = []
    for imp in imports():
        s, t = imp.source, imp.target
        where = f"{s} imports {t} (line {imp.line})"
        if _under(s, INFRA):
            if not (_under(t, INFRA) or any(_under(t, ok) for ok in INFRA_MAY_IMPORT)):
                bad.append(f"{where}: infra may import only {', '.join(INFRA_MAY_IMPORT)}")
            continue
        if _under(t, INFRA):
            if not _under(s, "prefixflow.cli"):
                bad.append(f"{where}: only the CLI imports infra")
            continue
        ls, lt = layer(s), layer(t)
        if ls is None or lt is None:
            continue
        if lt < ls or (lt == ls and package_of(s) != package_of(t)):
            bad.append(f"{where}: {package_of(t)} is not below {package_of(s)}")
    return bad


def cycles() -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's strongly connected
    components of more than one module), deferred imports included."""
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in imports():
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found

"""The shape of the code, checked from the source: the layer order (the CLI -> flows -> serving | tasks -> launch
-> services -> settings, processes -> prefix_core; infra beside them), no import cycle, every ``PREFIXFLOW_*``
variable read in settings.py, module sizes, loggers named after their module, and every module path that README
and docs name exists."""

from __future__ import annotations

import ast
import re

import pytest

from support import imports
from support.imports import ROOT

SIZE_LIMIT = 400  # lines per module
CLI_SIZE_LIMIT = 200
SIZE_EXEMPT: set[str] = set()
ENV_READERS = {"prefixflow/settings.py", "prefix_core/base_model.py"}  # prefix_core reads only its model cache


def _code_files() -> dict[str, ast.Module]:
    return {str(path.relative_to(ROOT)): ast.parse(path.read_text()) for path in imports.modules().values()}


def test_no_module_imports_against_the_layer_order():
    assert imports.violations() == []


def test_no_import_cycle():
    assert imports.cycles() == []


def test_prefix_core_depends_on_no_pipeline_service():
    banned = ("prefect", "mlflow", "boto3", "botocore", "prefixflow")
    found = []
    for name, tree in _code_files().items():
        if not name.startswith("prefix_core/"):
            continue
        for node in ast.walk(tree):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{name}:{node.lineno} imports {t}" for t in targets if t.split(".")[0] in banned]
    assert found == []


def _constants(tree: ast.Module) -> dict[str, str]:
    return {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for t in node.targets if isinstance(t, ast.Name)}


def _env_reads(tree: ast.Module, settings_constants: dict[str, str]):
    """(line, variable) of each read of an environment variable whose name is known here: os.environ.get(X),
    os.getenv(X), os.environ[X] (read), X in os.environ, with X a string or a constant naming one."""
    known = _constants(tree)

    def name_of(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return known.get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "settings":
            return settings_constants.get(node.attr)
        return None

    def is_environ(node) -> bool:
        return ast.unparse(node) in ("os.environ", "environ")

    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Call) and node.args:
            func = ast.unparse(node.func)
            if func in ("os.getenv", "getenv") or (func.endswith(".get") and is_environ(node.func.value)):
                arg = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_environ(node.value):
            arg = node.slice
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            arg = node.left
        name = name_of(arg) if arg is not None else None
        if name is not None:
            yield node.lineno, name


def test_prefixflow_variables_are_read_only_in_settings():
    files = _code_files()
    settings_constants = _constants(files["prefixflow/settings.py"])
    reads = [f"{name}:{line} reads {var}" for name, tree in files.items() if name not in ENV_READERS
             for line, var in _env_reads(tree, settings_constants) if var.startswith("PREFIXFLOW_")]
    assert reads == []
    core = [var for line, var in _env_reads(files["prefix_core/base_model.py"], {})
            if var.startswith("PREFIXFLOW_")]
    assert core == ["PREFIXFLOW_MODEL_CACHE"]


def test_the_check_of_variable_reads_can_fail():
    tree = ast.parse('import os\nV = "PREFIXFLOW_X"\nos.environ.get(V)\nos.getenv("PREFIXFLOW_Y")\n'
                     'os.environ["PREFIXFLOW_Z"]\nprint("PREFIXFLOW_W" in os.environ)\nos.environ.get(settings.A)\n')
    assert sorted(v for _, v in _env_reads(tree, {"A": "PREFIXFLOW_A"})) == [
        "PREFIXFLOW_A", "PREFIXFLOW_W", "PREFIXFLOW_X", "PREFIXFLOW_Y", "PREFIXFLOW_Z"]


def test_modules_are_small():
    big = []
    for path in imports.modules().values():
        name, lines = str(path.relative_to(ROOT)), len(path.read_text().splitlines())
        limit = CLI_SIZE_LIMIT if name.startswith("prefixflow/cli/") else SIZE_LIMIT
        if lines > limit and name not in SIZE_EXEMPT:
            big.append(f"{name}: {lines} lines (limit {limit})")
    assert big == []


def test_loggers_are_named_after_their_module():
    named = []
    for name, tree in _code_files().items():
        for node in tree.body:  # module-level `log = logging.getLogger("...")`
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and ast.unparse(node.value.func).endswith("getLogger") \
                    and ast.unparse(node.value.args) != "[Name(id='__name__', ctx=Load())]" \
                    and [ast.unparse(a) for a in node.value.args] != ["__name__"]:
                named.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert named == []


_PATH = re.compile(r"(?<![\w/:.@-])((?:prefixflow|flows|tasks|infra|prefix_core|tests|benchmarks|docs)/[\w./-]*\w)")
_MODULE = re.compile(r"(?<![\w/.=-])((?:prefixflow|prefix_core)(?:\.[a-z_][a-z0-9_]*)+)")  # not a file=
DOCS = ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS)
def test_every_module_and_path_a_doc_names_exists(doc):
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    text = path.read_text()
    known = imports.modules()
    missing = []
    for m in _PATH.finditer(text):
        target = m.group(1).rstrip(".")
        if "." in target.rsplit("/", 1)[-1] and not (ROOT / target).exists():  # a file: folders may be examples
            missing.append(target)
    sources = "\n".join(f.read_text() for f in known.values())
    for m in _MODULE.finditer(text):
        dotted = m.group(1)
        if f'"{dotted}' in sources:  # a name the code spells as a string (a Prefect event or resource id)
            continue
        module = dotted
        while module and module not in known:
            module = module.rpartition(".")[0]
        if module.count(".") == 0:
            missing.append(dotted)  # not even a subpackage resolves
        elif module != dotted:  # MODULE.name: the name must be defined in the module
            attr = dotted[len(module) + 1 :].split(".")[0]
            source = known[module].read_text()
            if not re.search(rf"^(?:def|class|async def) {attr}\b|^{attr}\s*[:=]|\b{attr}\b.*import|import.*\b{attr}\b",
                             source, re.M):
                missing.append(dotted)
    assert missing == [], f"{doc} names what does not exist: {sorted(set(missing))}"


def _deferred_imports(tree: ast.Module):
    """(line, module) of each import inside a function or class body (not under ``if TYPE_CHECKING``)."""
    top = {id(n) for n in tree.body}
    typing_only = {id(c) for stmt in tree.body if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
                   for c in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top | typing_only:
            name = node.names[0].name if isinstance(node, ast.Import) else "." * node.level + (node.module or "")
            yield node.lineno, name


def test_imports_are_at_module_top_unless_deferred_on_purpose():
    """Standard-library imports are never deferred; a module that defers others (a heavy library, or Prefect
    before its settings are made) says so once, in its docstring or a comment, with the word "deferred"."""
    import sys

    bad = []
    for name, path in ((str(p.relative_to(ROOT)), p) for p in imports.modules().values()):
        source = path.read_text()
        deferred = list(_deferred_imports(ast.parse(source)))
        stdlib = [f"{name}:{line} {m}" for line, m in deferred if m.split(".")[0] in sys.stdlib_module_names]
        bad += [f"{s} (standard library: import it at the top)" for s in stdlib]
        if deferred and not re.search(r"\bdeferred\b", source, re.I):
            bad.append(f"{name}: defers {', '.join(sorted({m for _, m in deferred}))} without saying why")
    assert bad == []


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md names each module (prefix_core's by file name, in its own table)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path in imports.modules().values():
        name = str(path.relative_to(ROOT))
        short = path.name if name.startswith("prefix_core/") else name
        if path.name not in ("__init__.py", "__main__.py") and f"`{name}`" not in doc and f"`{short}`" not in doc:
            missing.append(name)
    assert missing == []

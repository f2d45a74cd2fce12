"""The README's layout table matches the package tree: every module is listed, every listed module exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hypha_celery"


def _rows() -> dict[str, str]:
    """Layout rows keyed by their first cell's first path (``hypha_celery/worker/``, ``hypha_celery/keys.py``)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Layout"):]
    rows = {}
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "hypha_celery/" in cells[1]:
            first = re.findall(r"`([^`]+)`", cells[1])[0]
            rows[first] = line
    return rows


def _modules() -> list[Path]:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_in_the_layout_table() -> None:
    rows = _rows()
    missing = []
    for module in _modules():
        if len(module.parts) == 1:
            found = any(re.search(rf"[`/ ]{re.escape(module.name)}`", row) for key, row in rows.items()
                        if key.count("/") == 1)
        else:
            row = rows.get(f"hypha_celery/{module.parts[0]}/", "")
            found = (module.name == "__init__.py" and bool(row)) or f"`{module.name}`" in row
        if not found:
            missing.append(str(module))
    assert missing == []


def test_every_module_the_table_names_exists() -> None:
    named = []
    for key, row in _rows().items():
        folder = PACKAGE / key.removeprefix("hypha_celery/") if key.endswith("/") else PACKAGE
        for name in re.findall(r"`([\w]+\.py)`", row):
            # a folder's row names the modules of its sub-packages too (stages/validation/infer.py as `infer.py`)
            if not any(folder.rglob(name)) and not (PACKAGE / name).exists():
                named.append(f"{key} {name}")
    assert named == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every hypha_celery module and the hypha_celery modules it imports: at module level, in functions, under
    TYPE_CHECKING alike (an import anywhere in a module is an edge), each resolved to the module it names."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            found.update(target for name in names if name.startswith("hypha_celery")
                         and (target := resolve(name)) is not None and target != module)
        graph[module] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _reaching(graph: dict[str, set[str]], lower: str, upper: tuple[str, ...]) -> list[str]:
    """Imports from modules under ``lower`` of modules under any of ``upper`` (dotted prefixes)."""
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return sorted(f"{module} -> {target}" for module, targets in graph.items() if under(module, lower)
                  for target in targets if any(under(target, prefix) for prefix in upper))


ABOVE_STORAGE = tuple(f"hypha_celery.{name}" for name in ("executor", "stages", "tasks", "worker", "training", "runtimes"))


def test_models_and_formats_import_nothing_above_them() -> None:
    # Given every import in models/ and formats/, function-level and TYPE_CHECKING ones too
    graph = _imports()
    # Then none reaches the executor, the stages, the tasks, the worker, training or the runtimes
    # (the work types live in protocol.py, the manifest types in manifest.py, below all of them)
    assert _reaching(graph, "hypha_celery.models", ABOVE_STORAGE) == []
    assert _reaching(graph, "hypha_celery.formats", ABOVE_STORAGE) == []


def test_formats_sit_below_models_and_the_manifest_below_both() -> None:
    # Given the import graph
    graph = _imports()
    # Then formats/ never imports models/ (the store hands itself to a format as its Target) ...
    assert _reaching(graph, "hypha_celery.formats", ("hypha_celery.models",)) == []
    # ... the manifest types import nothing of ours but the error tree and sizes ...
    assert graph["hypha_celery.manifest"] <= {"hypha_celery.errors", "hypha_celery.units"}
    # ... and the config names a model id from the manifest, below it, never from models/
    assert _reaching(graph, "hypha_celery.config", ("hypha_celery.models", "hypha_celery.formats")) == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    # Given every module's imports, at module level, in functions and under TYPE_CHECKING alike
    # Then no group of modules imports itself round (a cycle), however long the way round
    assert _cycles(_imports()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # Given a graph where a -> b -> c -> a, and d -> a
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    # Then the one cycle is found, and d (which only reaches it) is not in it
    assert _cycles(graph) == [["a", "b", "c"]]

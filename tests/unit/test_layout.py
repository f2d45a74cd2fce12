"""The README's layout table matches the package tree: every module is listed, every listed module exists."""

from __future__ import annotations

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
            # a subpackage's modules are named in their top folder's row (training/finetune/run.py: `run.py`)
            if not any(folder.rglob(name)) and not (PACKAGE / name).exists():
                named.append(f"{key} {name}")
    assert named == []


def test_the_model_layer_imports_nothing_above_it() -> None:
    # Given every import statement in models/, function-level ones too
    upward = re.compile(r"^\s*(from|import) hypha_celery\.(executor|stages|tasks|worker|training)\b")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sorted((PACKAGE / "models").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if upward.match(line)]
    # Then none reaches the executor, the stages, the tasks, the worker or training (shared types live below them)
    assert found == []

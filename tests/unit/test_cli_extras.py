"""A command that reaches a package its install lacks names the extra that brings it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hypha_celery.cli.main import main
from hypha_celery.models.store import ModelStore


@pytest.mark.parametrize(("module", "extra"), [("transformers", "hf"), ("onnxruntime", "onnx"), ("torch", "worker")])
def test_a_missing_package_is_named_with_its_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str,
                                                   extra: str) -> None:
    # Given an import that needs a package this install lacks
    def lacking(*args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(ModelStore, "add", lacking)
    (tmp_path / "model").mkdir()
    # When the command runs
    done = CliRunner().invoke(main, ["models", "import", str(tmp_path / "model"), "--store", str(tmp_path / "s")])
    # Then it names the extra to install, in one line
    assert done.exit_code == 1
    assert f"pip install 'hypha-celery[{extra}]'" in done.output and len(done.output.strip().splitlines()) == 1

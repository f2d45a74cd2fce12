"""The runtime registry: every manifest runtime has one module, imported only when used, and the runtimes stay
below the executor, the stages, the tasks and the worker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hypha_celery.errors import InvalidInput, UnsupportedModel
from hypha_celery.formats.registry import RUNTIMES as MANIFEST_RUNTIMES
from hypha_celery.runtimes import registry
from hypha_celery.work import Generate, Prompt

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hypha_celery"


def test_every_runtime_a_manifest_may_name_has_a_module() -> None:
    # Given the runtimes a manifest may name, Then the registry has exactly those, and each module imports
    assert sorted(registry.RUNTIMES) == sorted(MANIFEST_RUNTIMES)
    for name in MANIFEST_RUNTIMES:
        module = registry.runtime(name)
        assert callable(module.load) and callable(module.infer_batch)


def test_an_unknown_runtime_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModel, match="'gguf'"):
        registry.runtime("gguf")


def test_importing_the_registry_imports_no_runtime() -> None:
    # Given a fresh interpreter, When it imports the registry, the work types and the protocol
    script = ("import sys; import hypha_celery.runtimes.registry, hypha_celery.work, hypha_celery.protocol; "
              "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    # Then none of the heavy libraries was imported
    assert out.stdout.strip() == "[]"


def test_a_model_of_a_runtime_that_does_not_generate_is_refused() -> None:
    # Given a loaded built-in model (only its manifest matters here)
    loaded = SimpleNamespace(manifest=SimpleNamespace(id="m", runtime="builtin"))
    request = Generate(model="m", params={}, prompts=[Prompt(prompt="hi")])
    # When it is asked to generate, Then it refuses, naming the model
    with pytest.raises(InvalidInput, match="'m' is a builtin model: it does not generate text"):
        registry.generate(loaded, request, lambda _update: None)


def test_a_transformers_model_is_not_loaded_trainable() -> None:
    # Training a transformers model is fine-tuning, which loads the model itself
    with pytest.raises(UnsupportedModel, match="fine-tuning"):
        registry.runtime("transformers").load(SimpleNamespace(id="m"), "cpu", trainable=True)  # type: ignore[arg-type]


def test_the_runtimes_and_the_work_types_import_nothing_above_them() -> None:
    # Given every import statement in runtimes/ and work.py, function-level ones too
    upward = re.compile(r"^\s*(from|import) hypha_celery\.(executor|stages|tasks|worker|training|protocol)\b")
    paths = [*sorted((PACKAGE / "runtimes").rglob("*.py")), PACKAGE / "work.py"]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in paths
             for number, line in enumerate(path.read_text().splitlines(), 1) if upward.match(line)]
    # Then none reaches the executor and its protocol, the stages, the tasks, the worker or training
    assert found == []
    # And work.py imports nothing of ours at all
    assert not re.search(r"^\s*(from|import) hypha_celery", (PACKAGE / "work.py").read_text(), re.MULTILINE)

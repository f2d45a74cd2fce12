"""ONNX models through the CLI and a real worker: import, torch parity, batching, refused external data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch
from celery.exceptions import TimeoutError as CeleryTimeout

from hypha_celery.formats.registry import read_manifest
from hypha_celery.formats.safe_files import sha256_file
from hypha_celery.manifest import MODEL_MANIFEST, ONNX_FILE
from hypha_celery.models.examples import ONNX_MLP, export_onnx, fitted_mlp

ROOT = Path(__file__).resolve().parents[2]
ROWS = [[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0], [4.4, 2.9, 1.4, 0.2],
        [6.1, 2.6, 5.6, 1.4], [5.7, 2.8, 4.1, 1.3], [7.7, 3.0, 6.1, 2.3], [5.1, 3.5, 1.4, 0.3]]
SMALL = {"cpu_cores": 0.1, "memory": "1GB"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypha_celery.cli", "models", "import", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))


def test_the_cli_imports_an_onnx_file_and_a_folder_holding_one(tmp_path: Path) -> None:
    # Given the mlp exported once as a bare .onnx file and once as model.onnx in a folder with a README
    export_onnx(fitted_mlp(), tmp_path / "iris.onnx", [4])
    folder = tmp_path / "iris-folder"
    folder.mkdir()
    shutil.copyfile(tmp_path / "iris.onnx", folder / ONNX_FILE)
    (folder / "README.md").write_text("an mlp\n")
    store = tmp_path / "store"
    # When both are imported through the CLI
    by_file = cli(str(tmp_path / "iris.onnx"), "--store", str(store))
    by_folder = cli(str(folder), "--id", "iris2", "--store", str(store))
    # Then both are stored as runtime onnx (the file under its stem), the graph described, the README skipped
    assert by_file.returncode == 0, by_file.stderr
    assert by_folder.returncode == 0, by_folder.stderr
    for model_id in ("iris", "iris2"):
        manifest = read_manifest(json.loads((store / model_id / MODEL_MANIFEST).read_text()), model_id)
        assert manifest.runtime == "onnx" and manifest.batchable and manifest.input_shape == [4]
        assert sorted(p.name for p in (store / model_id).iterdir() if not p.name.startswith(".")) == [
            MODEL_MANIFEST, ONNX_FILE]
    assert "input    input float32 [None, 4] (per sample [4]); dynamic batch axis 0" in by_file.stdout
    assert "output   scores float32 [None, 3]" in by_file.stdout
    assert "skipped  README.md" in by_folder.stdout


def test_the_cli_refuses_external_data_with_the_reason(tmp_path: Path) -> None:
    import onnx

    # Given a folder whose model.onnx keeps its weights in weights.bin
    export_onnx(fitted_mlp(), tmp_path / "m.onnx", [4])
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(onnx.load_model_from_string((tmp_path / "m.onnx").read_bytes()), str(folder / ONNX_FILE),
                    save_as_external_data=True, location="weights.bin", size_threshold=0)
    # When it is imported, Then the CLI fails naming external data, and the store holds nothing
    out = cli(str(folder), "--store", str(tmp_path / "store"))
    assert out.returncode != 0
    assert "uses external data" in out.stderr and "CVE-2024-27318" in out.stderr
    assert not (tmp_path / "store" / "ext").exists()


def _infer(app: Any, **kwargs: object) -> dict[str, Any]:
    return app.send_task("hypha.infer", kwargs={"requirements": SMALL, **kwargs}).get(timeout=120)


def test_a_worker_answers_like_the_torch_model_it_was_exported_from(start_worker, celery_client) -> None:
    # Given a worker whose store holds onnx-mlp (init-examples exports the fitted mlp)
    start_worker()
    # When it runs rows with the default ("auto") requirements
    result = celery_client().send_task("hypha.infer", kwargs={"model": ONNX_MLP, "inputs": ROWS}).get(timeout=120)
    # Then the answer equals the torch module's within float tolerance
    with torch.no_grad():
        reference = fitted_mlp()(torch.tensor(ROWS))
    assert torch.allclose(torch.tensor(result["output"]), reference, atol=1e-4)


def test_concurrent_requests_run_as_one_batch_and_equal_single_answers(start_worker, celery_client) -> None:
    # Given a worker that waits up to 0.3 s to form a batch
    start_worker({"max_concurrent_tasks": 8, "batching": {"max_queue_delay_microseconds": 300_000}})
    app = celery_client()
    singles = [_infer(app, model=ONNX_MLP, inputs=row) for row in ROWS]
    # When the same rows arrive together, as eight requests
    sent = [app.send_task("hypha.infer", kwargs={"model": ONNX_MLP, "inputs": row, "requirements": SMALL})
            for row in ROWS]
    batched = [result.get(timeout=120) for result in sent]
    # Then some ran in one pass along the batch axis, and every answer equals the one it got alone
    assert max(r["metrics"]["batch_size"] for r in batched) > 1
    assert all(r["metrics"]["batch_size"] == 1 for r in singles)
    for one, many in zip(singles, batched, strict=True):
        assert many["output"] == pytest.approx(one["output"], abs=1e-6)


def test_a_stored_graph_planting_an_external_data_path_is_refused(start_worker, celery_client, model_dir: Path,
                                                                  tmp_path: Path) -> None:
    from onnx import TensorProto, load_model_from_string

    # Given a store entry (hashes forged to match) whose graph points a weight at a file outside the store
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 1024)
    store = tmp_path / "store"
    shutil.copytree(model_dir, store, ignore=shutil.ignore_patterns(".locks"))
    folder = store / ONNX_MLP
    graph_model = load_model_from_string((folder / ONNX_FILE).read_bytes())
    tensor = graph_model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../secret.bin"
    (folder / ONNX_FILE).write_bytes(graph_model.SerializeToString())
    manifest = json.loads((folder / MODEL_MANIFEST).read_text())
    manifest["files"][ONNX_FILE] = {"sha256": sha256_file(folder / ONNX_FILE), "size": (folder / ONNX_FILE).stat().st_size}
    (folder / MODEL_MANIFEST).write_text(json.dumps(manifest))
    start_worker({"models": {"model_dir": str(store)}})
    # When a task runs it
    result = celery_client().send_task("hypha.infer", kwargs={"model": ONNX_MLP, "inputs": ROWS[0], "requirements": SMALL})
    # Then it fails with UnsupportedModel, naming the external data
    with pytest.raises(Exception) as caught:
        result.get(timeout=60)
    assert not isinstance(caught.value, CeleryTimeout)
    assert type(caught.value).__name__ == "UnsupportedModel" and "uses external data" in str(caught.value)


def test_texts_sent_to_an_onnx_model_are_refused_before_running(start_worker, celery_client) -> None:
    start_worker()
    result = celery_client().send_task("hypha.infer", kwargs={"model": ONNX_MLP, "texts": ["hello"]})
    with pytest.raises(Exception) as caught:
        result.get(timeout=60)
    assert not isinstance(caught.value, CeleryTimeout)
    assert type(caught.value).__name__ == "InvalidInput" and "ONNX model: it takes inputs" in str(caught.value)

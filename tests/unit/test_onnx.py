"""The ONNX runtime: graph checks at import (external data, custom ops), torch parity, batching, sizing."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from hypha_celery.errors import UnsupportedModel  # noqa: E402
from hypha_celery.formats import onnx as onnx_format  # noqa: E402
from hypha_celery.formats.registry import read_manifest  # noqa: E402
from hypha_celery.formats.safe_files import sha256_file  # noqa: E402
from hypha_celery.manifest import (  # noqa: E402
    MODEL_MANIFEST,
    ONNX_FILE,
    expected_size,
)
from hypha_celery.models.examples import export_onnx, fitted_mlp  # noqa: E402
from hypha_celery.models.store import ModelStore  # noqa: E402
from hypha_celery.runtimes.registry import infer_batch, load  # noqa: E402
from hypha_celery.stages.sizing import HOST_FLOOR, estimate  # noqa: E402

ROWS = [[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0], [1.0, -2.0, 0.5, 3.0]]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlp() -> torch.nn.Module:
    return fitted_mlp()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def exported(mlp: torch.nn.Module, folder: Path, *, dynamic_batch: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(mlp, folder / ONNX_FILE, [4], dynamic_batch=dynamic_batch)
    return folder


def with_external_tensor(source: Path, target: Path, location: str) -> Path:
    """``source``'s graph with its first initializer moved out to ``location`` (data_location EXTERNAL)."""
    graph_model = onnx.load_model_from_string(source.read_bytes())
    tensor = graph_model.graph.initializer[0]
    size = len(tensor.raw_data) or 64
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(graph_model.SerializeToString())
    return target


def test_an_imported_graph_records_its_input_outputs_batch_axis_and_weights(store: ModelStore, mlp, tmp_path) -> None:
    # Given the mlp exported with a dynamic batch axis
    folder = exported(mlp, tmp_path / "src")
    # When it is imported
    manifest = store.add("onnx", folder, "m").manifest
    # Then the manifest names the graph's input and output, the batch axis, and the initializers' bytes
    parameters = sum(p.numel() for p in mlp.parameters())
    assert (manifest.runtime, manifest.architecture, manifest.task, manifest.format) == (
        "onnx", "onnx", "inference", "hypha-model/2")
    assert manifest.input_shape == [4] and manifest.batchable and manifest.config["batch_axis"] == 0
    assert manifest.config["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 4]}]
    assert manifest.config["outputs"] == [{"name": "scores", "dtype": "float32", "shape": [None, 3]}]
    assert manifest.memory is not None
    assert (manifest.memory.parameters, manifest.memory.weights_bytes) == (parameters, 4 * parameters)
    assert list(manifest.files) == [ONNX_FILE]
    # And a reader of the stored manifest gets the same model
    stored = json.loads((store.path("m") / MODEL_MANIFEST).read_text())
    assert read_manifest(stored, "m") == manifest


def test_onnx_output_equals_the_torch_reference(store: ModelStore, mlp, tmp_path) -> None:
    # Given the imported mlp
    store.add("onnx", exported(mlp, tmp_path / "src"), "m")
    loaded, size = load(store.open("m"), "cpu")
    # When rows are sent as a nested list and as an encoded float32 tensor
    encoded = {"dtype": "float32", "shape": [4, 4],
               "data": base64.b64encode(torch.tensor(ROWS).numpy().tobytes()).decode()}
    as_list, as_tensor = infer_batch(loaded, [ROWS, encoded])
    # Then both equal torch's answer within float tolerance, each in its input's form
    with torch.no_grad():
        reference = mlp(torch.tensor(ROWS))
    assert size == 4 * sum(p.numel() for p in mlp.parameters())
    assert torch.allclose(torch.tensor(as_list), reference, atol=1e-5)
    assert as_tensor["dtype"] == "float32" and as_tensor["shape"] == [4, 3]
    decoded = torch.frombuffer(bytearray(base64.b64decode(as_tensor["data"])), dtype=torch.float32).reshape(4, 3)
    assert torch.allclose(decoded, reference, atol=1e-5)


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_a_batch_answers_each_item_as_it_would_be_answered_alone(store: ModelStore, mlp, tmp_path, dynamic_batch) -> None:
    # Given the mlp exported with a dynamic batch axis, or with the batch fixed at 1 (batchable false)
    manifest = store.add("onnx", exported(mlp, tmp_path / "src", dynamic_batch=dynamic_batch), "m").manifest
    assert manifest.batchable is dynamic_batch
    loaded, _ = load(store.open("m"), "cpu")
    items = [ROWS[0], ROWS[1:3], [ROWS[3]], ROWS]
    # When the items run as one batch, and each alone
    together = infer_batch(loaded, items)
    alone = [infer_batch(loaded, [item])[0] for item in items]
    # Then every item gets its own rows back (one sample -> one row), equal to its answer alone
    assert [len(out) for out in together] == [3, 2, 1, 4]
    for one, many in zip(alone, together, strict=True):
        assert torch.allclose(torch.tensor(many), torch.tensor(one), atol=1e-6)


def test_a_model_with_external_data_is_refused_at_import(store: ModelStore, mlp, tmp_path) -> None:
    # Given the mlp saved by onnx with its weights in a second file, as onnx does for models over 2 GB
    graph_model = onnx.load_model_from_string((exported(mlp, tmp_path / "src") / ONNX_FILE).read_bytes())
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(graph_model, str(folder / ONNX_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").is_file()
    # When it is imported, Then it is refused with the reason, and nothing is stored
    with pytest.raises(UnsupportedModel, match=r"uses external data .*CVE-2024-27318"):
        store.add("onnx", folder, "m")
    assert not store.has("m") and store.list() == []


@pytest.mark.parametrize("where", ["traversal", "absolute"])
def test_a_planted_external_data_path_is_never_read(mlp, tmp_path: Path, where: str) -> None:
    # Given a marker file outside the store, and a stored graph (its manifest forged to match its bytes, as a
    # tampering source or store owner would) whose first initializer points at the marker
    marker = tmp_path / "outside" / "secret.bin"
    marker.parent.mkdir()
    marker.write_bytes(b"s" * 4096)
    store = ModelStore(tmp_path / "a" / "b" / "store")
    store.add("onnx", exported(mlp, tmp_path / "src"), "m")
    folder = store.path("m")
    location = "../../../../outside/secret.bin" if where == "traversal" else str(marker)
    assert (folder / location).resolve() == marker.resolve()
    with_external_tensor(folder / ONNX_FILE, folder / ONNX_FILE, location)
    manifest = json.loads((folder / MODEL_MANIFEST).read_text())
    manifest["files"][ONNX_FILE] = {"sha256": sha256_file(folder / ONNX_FILE), "size": (folder / ONNX_FILE).stat().st_size}
    (folder / MODEL_MANIFEST).write_text(json.dumps(manifest))
    # When an executor-like process loads it (a fresh interpreter, watching every file Python opens)
    script = textwrap.dedent(f"""
        import json, sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        from hypha_celery.errors import UnsupportedModel
        from hypha_celery.runtimes.registry import load
        from hypha_celery.models.store import ModelStore
        try:
            load(ModelStore({str(store.root)!r}).open("m"), "cpu")
            outcome = "loaded"
        except UnsupportedModel as exc:
            outcome = str(exc)
        print(json.dumps({{"outcome": outcome, "ort": "onnxruntime" in sys.modules,
                          "read_marker": any("secret.bin" in path for path in opened)}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # Then it is refused for its external data, before onnxruntime is even imported, and the marker was never opened
    assert "uses external data" in result["outcome"] and location in result["outcome"]
    assert result["ort"] is False and result["read_marker"] is False


def test_external_data_in_a_subgraph_is_refused(tmp_path: Path) -> None:
    # Given an If node whose then-branch holds a Constant with external data
    external = helper.make_tensor("c", TensorProto.FLOAT, [4], vals=[0.0] * 4)
    external.ClearField("float_data")
    external.data_location = TensorProto.EXTERNAL
    entry = external.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    const = helper.make_node("Constant", [], ["y"], value=external)
    branch = helper.make_graph([const], "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])])
    cond = helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("b", TensorProto.BOOL, [], [True]))
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)
    graph = helper.make_graph([cond, node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])])
    path = tmp_path / ONNX_FILE
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    # When it is described, Then it is refused, naming the planted location
    with pytest.raises(UnsupportedModel, match=r"'\.\./\.\./etc/passwd'.*uses external data"):
        onnx_format.describe(path)


def _graph(nodes: list, inputs: list, outputs: list, domains: tuple[str, ...] = ()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(domain, 1) for domain in domains]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def test_a_custom_op_domain_is_refused() -> None:
    # Given a graph with a node from a domain that needs a custom-op library
    data = _graph([helper.make_node("Evil", ["x"], ["y"], domain="com.example.ops")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], ("com.example.ops",))
    # When it is described, Then it is refused, naming the domain
    with pytest.raises(UnsupportedModel, match=r"custom domain\(s\) 'com.example.ops'.*shared library"):
        onnx_format.describe_bytes(data, "model")


@pytest.mark.parametrize(("inputs", "reason"), [
    ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
      helper.make_tensor_value_info("w", TensorProto.FLOAT, ["n", 4])], "2 inputs"),
    ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])], "only axis 0"),
    ([helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 4])], "is int64"),
])
def test_a_graph_the_runtime_cannot_feed_is_refused(inputs: list, reason: str) -> None:
    data = _graph([helper.make_node("Identity", ["x"], ["y"])], inputs,
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    with pytest.raises(UnsupportedModel, match=reason):
        onnx_format.describe_bytes(data, "model")


def test_a_manifest_that_disagrees_with_its_graph_is_refused(store: ModelStore, mlp, tmp_path) -> None:
    # Given a stored graph whose manifest understates its weights
    store.add("onnx", exported(mlp, tmp_path / "src"), "m")
    path = store.path("m") / MODEL_MANIFEST
    manifest = json.loads(path.read_text())
    manifest["memory"]["weights_bytes"] = 1
    path.write_text(json.dumps(manifest))
    # When it is checked as a fetched model, or loaded, Then both refuse it
    with pytest.raises(UnsupportedModel, match="disagrees with its graph on memory"):
        onnx_format.check_fetched(store.path("m"), store.manifest("m"))
    with pytest.raises(UnsupportedModel, match="disagrees with its graph"):
        load(store.open("m"), "cpu")


def test_training_an_onnx_model_is_refused(store: ModelStore, mlp, tmp_path) -> None:
    store.add("onnx", exported(mlp, tmp_path / "src"), "m")
    with pytest.raises(UnsupportedModel, match="cannot be trained"):
        load(store.open("m"), "cpu", trainable=True)


def test_sizing_counts_the_graph_weights_and_its_load(store: ModelStore, mlp, tmp_path) -> None:
    # Given an imported graph
    manifest = store.add("onnx", exported(mlp, tmp_path / "src"), "m").manifest
    assert manifest.memory is not None
    weights, file_size = manifest.memory.weights_bytes, manifest.files[ONNX_FILE].size
    # Then its weights keep their dtype on every device, and a first CPU load reserves the file twice more
    assert expected_size(manifest, "cpu") == expected_size(manifest, "cuda") == weights
    first = estimate(manifest, gpu=False, cached=False)
    assert first.host == weights + weights // 10 + HOST_FLOOR + 2 * file_size
    assert estimate(manifest, gpu=False, cached=True).host == HOST_FLOOR


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: m["files"].update({"weights.bin": m["files"][ONNX_FILE]}), "external data is refused"),
    (lambda m: m["config"].update({"batch_axis": None}), "invalid batch_axis"),
    (lambda m: m["config"].update({"inputs": []}), "invalid config.inputs"),
    (lambda m: m.update({"architecture": "mlp"}), "an ONNX model has 'onnx' / 'inference'"),
    (lambda m: m["memory"].update({"weights_bytes": -1}), "invalid memory estimate"),
])
def test_an_onnx_manifest_breaking_a_rule_is_refused(store: ModelStore, mlp, tmp_path, change, reason) -> None:
    # Given a valid ONNX manifest, When one rule is broken, Then a reader refuses it with the reason
    data = store.add("onnx", exported(mlp, tmp_path / "src"), "m").manifest.to_json()
    change(data)
    with pytest.raises(UnsupportedModel, match=reason):
        read_manifest(data, "m")


def test_the_worker_checks_an_onnx_payload_before_any_executor(store: ModelStore, mlp, tmp_path) -> None:
    from hypha_celery.errors import InvalidInput
    from hypha_celery.stages.validation import check_infer_payload

    # Given an imported graph taking 4 features per sample
    manifest = store.add("onnx", exported(mlp, tmp_path / "src"), "m").manifest
    # Then rows of 4 pass, and texts or rows of another width are refused with the reason
    check_infer_payload(manifest, "inputs", ROWS, 1 << 20)
    with pytest.raises(InvalidInput, match=r"takes \[4\] per sample"):
        check_infer_payload(manifest, "inputs", [[1.0, 2.0, 3.0]], 1 << 20)
    with pytest.raises(InvalidInput, match="ONNX model: it takes inputs"):
        check_infer_payload(manifest, "texts", {"texts": ["hello"]}, 1 << 20)


def test_a_fetched_graph_is_checked_again_and_a_planted_one_never_installed(mlp, tmp_path: Path) -> None:
    from hypha_celery.config import ModelSource

    # Given a source store serving a good graph, and one whose graph (hashes forged) points at external data
    served = ModelStore(tmp_path / "served")
    served.add("onnx", exported(mlp, tmp_path / "src"), "good")
    served.add("onnx", exported(mlp, tmp_path / "src"), "bad")
    folder = served.path("bad")
    with_external_tensor(folder / ONNX_FILE, folder / ONNX_FILE, "../good/model.onnx")
    manifest = json.loads((folder / MODEL_MANIFEST).read_text())
    manifest["files"][ONNX_FILE] = {"sha256": sha256_file(folder / ONNX_FILE), "size": (folder / ONNX_FILE).stat().st_size}
    (folder / MODEL_MANIFEST).write_text(json.dumps(manifest))
    store = ModelStore(tmp_path / "worker", [ModelSource(type="local", path=str(served.root))])
    # When a worker's store fetches both
    loaded, _ = load(store.open("good"), "cpu")
    # Then the good one runs, and the planted one is refused at the fetch and never installed
    assert torch.allclose(torch.tensor(infer_batch(loaded, [ROWS])[0]), mlp(torch.tensor(ROWS)).detach(), atol=1e-5)
    with pytest.raises(UnsupportedModel, match="uses external data"):
        store.manifest("bad")
    assert not store.has("bad")

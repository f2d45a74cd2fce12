"""Hugging Face directories and manifest version 2: the allow-list matches transformers, refusals and skips, the fields."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats import huggingface
from hypha_celery.formats.huggingface import ALLOWED
from hypha_celery.formats.registry import read_manifest
from hypha_celery.manifest import FORMAT, FORMAT_V2, ModelMemory, compute_dtype

SHA = "ab" * 32


def tiny_safetensors(elements: int = 6, dtype: str = "F32", itemsize: int = 4) -> bytes:
    header = json.dumps({"w": {"dtype": dtype, "shape": [elements], "data_offsets": [0, elements * itemsize]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(elements * itemsize)


def hf_dir(folder: Path, config: dict[str, Any], **extra: bytes | str) -> Path:
    """A minimal Hugging Face directory: config.json, model.safetensors, and ``extra`` files by name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(tiny_safetensors())
    for name, content in extra.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


BERT = {"model_type": "bert", "architectures": ["BertModel"], "max_position_embeddings": 512}


def v2(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": FORMAT_V2, "id": "m", "runtime": "transformers", "model_type": "llama",
        "architecture": "LlamaForCausalLM", "task": "text-generation", "dtype": "bfloat16",
        "files": {"config.json": {"sha256": SHA, "size": 10}, "model.safetensors": {"sha256": SHA, "size": 100}},
        "memory": {"parameters": 50, "weights_bytes": 100, "kv_bytes_per_token": 256}, "max_length": 2048,
        "labels": None, "dropped_config_keys": ["auto_map"],
    }
    data.update(overrides)
    return data


_MAPPINGS = {
    "feature-extraction": "MODEL_MAPPING_NAMES",
    "text-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "text-generation": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}


@pytest.mark.parametrize(("model_type", "architecture", "task"),
                         [(t, a, task) for t, archs in ALLOWED.items() for a, task in archs.items()])
def test_each_allowed_architecture_is_the_class_transformers_maps_its_model_type_and_task_to(
        model_type: str, architecture: str, task: str) -> None:
    # Given the installed transformers' auto mappings
    modeling_auto = pytest.importorskip("transformers.models.auto.modeling_auto")
    mapping = getattr(modeling_auto, _MAPPINGS[task])
    # When the allow-list's entry is looked up there, Then transformers maps that type and task to that very class
    mapped = mapping.get(model_type)
    assert architecture in ((mapped,) if isinstance(mapped, str) else tuple(mapped or ()))


@pytest.mark.parametrize(("name", "why"), [
    ("pytorch_model.bin", "CVE-2025-32434"),
    ("weights.pt", "CVE-2026-24747"),
    ("model.pth", "pickle"),
    ("epoch=3.ckpt", "pickle"),
    ("tokenizer.pkl", "pickle"),
    ("model.pt2", "torch.export"),
    ("traced.jit", "TorchScript"),
    ("modeling_evil.py", "never runs a model's own code"),
    ("sub__helper.py", "never runs a model's own code"),
    ("adapter_config.json", "base_model_name_or_path"),
])
def test_a_directory_holding_a_refused_file_is_refused_naming_it_and_why(tmp_path: Path, name: str, why: str) -> None:
    # Given a valid directory plus one refused file
    folder = hf_dir(tmp_path / "m", BERT, **{name: b"x"})
    # When it is scanned, Then the whole import is refused, naming the file and the reason
    with pytest.raises(UnsupportedModel, match="refused") as caught:
        huggingface.scan(folder)
    assert name.replace("__", "/") in str(caught.value) and why in str(caught.value)


def test_a_pickle_beside_safetensors_weights_is_to_be_deleted_not_converted(tmp_path: Path) -> None:
    # Given a clone holding the weights twice: model.safetensors and pytorch_model.bin
    folder = hf_dir(tmp_path / "m", BERT, **{"pytorch_model.bin": b"x"})
    # When it is scanned
    with pytest.raises(UnsupportedModel) as caught:
        huggingface.scan(folder)
    # Then the refusal says to delete the pickle, since the safetensors weights are there already
    message = str(caught.value)
    assert "pytorch_model.bin is a pickle" in message and "already has the weights as model.safetensors" in message
    assert "delete the pickle" in message and "convert" not in message


def test_a_pickle_with_no_safetensors_beside_it_is_to_be_converted(tmp_path: Path) -> None:
    # Given a folder whose only weights are a pickle
    folder = hf_dir(tmp_path / "m", BERT, **{"pytorch_model.bin": b"x"})
    (folder / "model.safetensors").unlink()
    # When it is scanned, Then the refusal says to convert the weights
    with pytest.raises(UnsupportedModel, match="convert the weights to safetensors"):
        huggingface.scan(folder)


def test_files_off_the_allow_list_are_skipped_and_known_ones_copied(tmp_path: Path) -> None:
    # Given a sentence-transformers style directory with extras
    folder = hf_dir(tmp_path / "m", BERT, **{"README.md": "# hi", "vocab.txt": "a", ".gitattributes": "*",
                                             "1_Pooling__config.json": "{}", "modules.json": "[]",
                                             "2_Normalize__config.json": "{}", "onnx__model.onnx": "x"})
    # When it is scanned
    found = huggingface.scan(folder)
    # Then only allow-listed paths are copied (the pooling config is the one with a folder), the rest reported
    assert sorted(found.copy) == ["1_Pooling/config.json", "config.json", "model.safetensors", "modules.json"]
    assert sorted(found.skipped) == [".gitattributes", "2_Normalize/config.json", "README.md", "onnx/model.onnx",
                                     "vocab.txt"]


def test_a_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    # Given a directory holding only weights
    (tmp_path / "model.safetensors").write_bytes(tiny_safetensors())
    # When it is scanned, Then it is refused as not a Hugging Face directory
    with pytest.raises(UnsupportedModel, match=r"no config\.json"):
        huggingface.scan(tmp_path)


@pytest.mark.parametrize("key", ["quantization_config", "transformers_weights"])
def test_config_keys_that_load_something_else_are_refused(key: str) -> None:
    # Given a config carrying a key that changes what transformers loads
    # When it is cleaned, Then it is refused naming the key
    with pytest.raises(UnsupportedModel, match=key):
        huggingface.clean_config({**BERT, key: {"x": 1}})


def test_auto_map_is_dropped_and_reported() -> None:
    # Given a config whose auto_map points at the uploader's code
    # When it is cleaned
    config, dropped = huggingface.clean_config({**BERT, "auto_map": {"AutoModel": "modeling_evil.Evil"}})
    # Then the key is gone and named
    assert "auto_map" not in config and dropped == ["auto_map"]


@pytest.mark.parametrize(("config", "match"), [
    ({"model_type": "t5", "architectures": ["T5Model"]}, "model_type 't5' is not supported"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "'BertForMaskedLM' is not supported"),
    ({"model_type": "bert"}, "names no architecture"),
])
def test_a_model_type_or_architecture_off_the_allow_list_is_refused(config: dict[str, Any], match: str) -> None:
    # When an unsupported config is identified, Then it is refused with the reason
    with pytest.raises(UnsupportedModel, match=match):
        huggingface.identify(config)


def test_a_task_the_architecture_does_not_serve_is_refused() -> None:
    # When a BertModel is asked to generate text, Then it is refused naming the task it serves
    with pytest.raises(UnsupportedModel, match="serves task 'feature-extraction'"):
        huggingface.identify(BERT, "text-generation")


def test_describe_gives_labels_in_id_order_for_a_classifier(tmp_path: Path) -> None:
    # Given a classifier whose id2label is written out of order
    config = {"model_type": "bert", "architectures": ["BertForSequenceClassification"],
              "id2label": {"1": "positive", "0": "negative"}, "max_position_embeddings": 512}
    folder = hf_dir(tmp_path, config, **{"tokenizer_config.json": json.dumps({"model_max_length": 128})})
    # When it is described
    fields = huggingface.describe(folder, ["config.json", "model.safetensors", "tokenizer_config.json"])
    # Then labels follow the ids, and max_length is the smaller of the two limits
    assert fields["task"] == "text-classification" and fields["labels"] == ["negative", "positive"]
    assert fields["max_length"] == 128


def test_describe_sizes_the_kv_cache_of_a_generator(tmp_path: Path) -> None:
    # Given a Llama config with grouped-query attention (4 heads, 2 KV heads, head_dim 64/4 = 16), 2 layers
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
    folder = hf_dir(tmp_path, config)
    # When it is described
    fields = huggingface.describe(folder, ["config.json", "model.safetensors"])
    # Then KV bytes per token = 2 x layers x kv_heads x head_dim x 4 (fp32)
    assert fields["memory"] == ModelMemory(parameters=6, weights_bytes=24, kv_bytes_per_token=2 * 2 * 2 * 16 * 4)


def test_a_v2_manifest_reads_back_what_it_wrote() -> None:
    # Given a version-2 transformers manifest
    manifest = read_manifest(v2(), "m")
    # When it is written and read again, Then it is equal, with the v2 fields kept
    assert read_manifest(manifest.to_json(), "m") == manifest
    assert manifest.memory == ModelMemory(50, 100, 256) and manifest.runtime == "transformers"


def test_the_compute_dtype_sizes_come_from_the_parameter_count() -> None:
    # Given a bf16 checkpoint of 50 parameters with 256 KV bytes per token
    manifest = read_manifest(v2(), "m")
    # When it is sized for CPU (fp32) and CUDA (bf16)
    # Then the weights and KV cache scale with the element size
    assert (manifest.weights_bytes_at(compute_dtype("cpu")), manifest.weights_bytes_at(compute_dtype("cuda:0"))) == (200, 100)
    assert manifest.kv_bytes_per_token_at("float32") == 512


@pytest.mark.parametrize(("overrides", "match"), [
    ({"architecture": "LlamaModel"}, "not on the allow-list"),
    ({"model_type": "custom"}, "not on the allow-list"),
    ({"task": "feature-extraction"}, "serves 'text-generation'"),
    ({"runtime": "tensorflow"}, "unknown runtime"),
    ({"runtime": "onnx"}, "invalid input_shape None"),
    ({"files": {"config.json": {"sha256": SHA, "size": 1}, "model.safetensors": {"sha256": SHA, "size": 1},
                "../model.safetensors": {"sha256": SHA, "size": 1}}}, "invalid file name"),
    ({"files": {"config.json": {"sha256": SHA, "size": 1}, "model.safetensors": {"sha256": SHA, "size": 1},
                "2_Normalize/config.json": {"sha256": SHA, "size": 1}}}, "invalid file name"),
    ({"files": {"config.json": {"sha256": SHA, "size": 1}, "modeling_llama.py": {"sha256": SHA, "size": 1}}},
     "invalid file name"),
    ({"files": {"config.json": {"sha256": SHA, "size": 1}}}, "lists no weights"),
    ({"memory": {"parameters": 50, "weights_bytes": 100, "kv_bytes_per_token": None}}, "kv_bytes_per_token"),
    ({"memory": {"parameters": -1, "weights_bytes": 100, "kv_bytes_per_token": 1}}, "memory estimate"),
    ({"labels": ["a"]}, "does not classify"),
    ({"dtype": "int8"}, "unsupported dtype"),
])
def test_a_v2_manifest_breaking_a_rule_is_refused(overrides: dict[str, Any], match: str) -> None:
    # When a manifest breaking one rule is read, Then it is refused with the reason
    with pytest.raises(UnsupportedModel, match=match):
        read_manifest(v2(**overrides), "m")


def test_a_classifier_manifest_needs_its_labels() -> None:
    # Given a text-classification manifest without labels
    data = v2(model_type="bert", architecture="BertForSequenceClassification", task="text-classification",
              memory={"parameters": 1, "weights_bytes": 4, "kv_bytes_per_token": None})
    # When it is read, Then it is refused
    with pytest.raises(UnsupportedModel, match="invalid labels"):
        read_manifest(data, "m")


def test_a_version_1_manifest_reads_and_writes_as_before() -> None:
    # Given a version-1 manifest of a built-in mlp, as older workers wrote it
    data = {"format": FORMAT, "id": "m", "architecture": "mlp", "config": {"in_features": 4}, "input_shape": [4],
            "files": {"weights.safetensors": {"sha256": SHA, "size": 8}}, "dtype": "float32", "task": "classification",
            "batchable": True, "parent": None, "created_at": 1.0}
    # When it is read and written back
    manifest = read_manifest(data, "m")
    # Then it is the built-in runtime, and its JSON has exactly the version-1 keys
    assert manifest.runtime == "builtin" and manifest.memory is None
    assert manifest.to_json() == {**data, "format": FORMAT}


def test_a_builtin_architecture_in_a_v2_manifest_follows_the_v1_rules() -> None:
    # Given a v2 manifest with runtime builtin but no weights.safetensors
    data = {"format": FORMAT_V2, "id": "m", "runtime": "builtin", "architecture": "mlp", "input_shape": [4],
            "files": {"model.safetensors": {"sha256": SHA, "size": 8}}}
    # When it is read, Then it is refused as a built-in model without its weights file
    with pytest.raises(UnsupportedModel, match=r"does not list weights\.safetensors"):
        read_manifest(data, "m")

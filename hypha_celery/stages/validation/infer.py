"""``hypha.infer``'s arguments: a model and exactly one of ``inputs``, ``texts`` or ``images``.

``inputs`` are numbers, for the built-in architectures; ``texts`` are for embedding and text-classification
models; ``images`` for image classifiers. Texts and images are checked here, in the worker, without torch,
transformers or an image decoder: at most :data:`MAX_TEXTS` texts of at most :data:`MAX_TEXT_CHARS` characters;
at most :data:`MAX_IMAGES` base64 PNG or JPEG images of at most :data:`MAX_IMAGE_PIXELS` pixels each (read from
the PNG/JPEG header); the whole request within ``max_input_bytes``. What the inputs hold is ``InvalidInput``.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidInput, InvalidTask, UnsupportedModel
from hypha_celery.manifest import Manifest, validate_model_id
from hypha_celery.models.store import ModelStore
from hypha_celery.models.tensors import MAX_IMAGE_PIXELS, check_inputs
from hypha_celery.models.text_inputs import TextBound, check_texts
from hypha_celery.resources.requirements import Requirements
from hypha_celery.stages.validation.arguments import Arg, TaskArgs, check_arguments
from hypha_celery.stages.validation.common import MAX_TEXT_CHARS, MODEL, REQUIREMENTS, local_manifest, requirements_for

__all__ = ["MAX_IMAGES", "MAX_TEXTS", "InferSpec", "check_infer_payload", "image_size", "validate_infer"]

# Per request.
MAX_TEXTS = 256
MAX_IMAGES = 32
_KINDS = ("inputs", "texts", "images")
_TEXT_TASKS = ("feature-extraction", "text-classification")
# Each input's content is checked below (InvalidInput), by the kind the task used.
ARGS = TaskArgs("hypha.infer", (MODEL, *(Arg(kind) for kind in _KINDS), REQUIREMENTS),
                one_of=((_KINDS, "inputs (numbers), texts or images"),))


@dataclass(frozen=True)
class InferSpec:
    """``inputs`` is what the executor gets: a built-in model's rows, or ``{"texts": [...]}`` / ``{"images": [...]}``."""

    model: str
    inputs: Any
    requirements: Requirements
    manifest: Manifest | None
    kind: str = "inputs"  # which argument the task used: inputs, texts or images


def validate_infer(cfg: WorkerConfig, store: ModelStore, args: Sequence[Any], kwargs: Mapping[str, Any]) -> InferSpec:
    check_arguments(ARGS, args, kwargs)
    kind = next(kind for kind in _KINDS if kind in kwargs)
    model = validate_model_id(kwargs["model"])
    requirements = requirements_for(cfg, kwargs.get("requirements"), sizable=True)
    manifest = local_manifest(store, model)
    max_bytes = cfg.security.max_input_bytes
    if kind == "texts":
        payload: Any = {"texts": _check_texts(kwargs["texts"], max_bytes)}
        if manifest is None:  # fetched after admission: the worker-wide bound now, the model's under the lease
            check_texts(payload["texts"], "texts", TextBound.of(None, None, cfg.security.max_text_bytes))
    elif kind == "images":
        payload = {"images": _check_images(kwargs["images"], max_bytes)}
    else:
        payload = kwargs["inputs"]
        if manifest is None and not isinstance(payload, (list, dict)):
            raise InvalidInput("inputs must be a nested list of numbers or an encoded tensor object")
    if manifest is not None:
        check_infer_payload(manifest, kind, payload, max_bytes, cfg.security.max_text_bytes)
    return InferSpec(model=model, inputs=payload, requirements=requirements, manifest=manifest, kind=kind)


def check_infer_payload(manifest: Manifest, kind: str, payload: Any, max_bytes: int,
                        max_text_bytes: int | None = None) -> None:
    """Whether the model takes this kind of input: numbers for built-in models, texts or images by task.

    Texts are held to the model's byte bound (:mod:`hypha_celery.models.text_inputs`; ``max_text_bytes``: the
    worker's override).
    """
    model = manifest.id
    if manifest.runtime == "onnx":
        if kind != "inputs":
            raise InvalidInput(f"model {model!r} is an ONNX model: it takes inputs (numbers), not {kind}")
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            raise UnsupportedModel(f"model {model!r} is an ONNX model; this worker lacks the [onnx] extra")
        check_inputs(payload, manifest.input_shape, max_bytes=max_bytes, model=model)
        return
    if manifest.runtime != "transformers":
        if kind != "inputs":
            raise InvalidInput(f"model {model!r} is a built-in {manifest.architecture!r} model: it takes inputs, "
                               f"not {kind}")
        check_inputs(payload, manifest.input_shape, max_bytes=max_bytes, model=model)
        return
    if importlib.util.find_spec("transformers") is None:  # finds it without importing it
        raise UnsupportedModel(f"model {model!r} is a transformers model; this worker lacks the [hf] extra")
    if manifest.task == "text-generation":
        raise InvalidTask(f"model {model!r} generates text: send it hypha.generate, not hypha.infer")
    wanted = "texts" if manifest.task in _TEXT_TASKS else "images"
    if kind != wanted:
        raise InvalidInput(f"model {model!r} ({manifest.task}) takes {wanted}, not {kind}")
    if kind == "texts":
        check_texts(payload["texts"], "texts", TextBound.of(model, manifest.max_length, max_text_bytes))


def _check_texts(texts: Any, max_bytes: int) -> list[str]:
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise InvalidInput("texts must be a non-empty list of strings")
    if len(texts) > MAX_TEXTS:
        raise InvalidInput(f"texts holds {len(texts)} texts; at most {MAX_TEXTS} per request")
    check_texts(texts, "texts")  # Unicode scalar values only
    longest = max(len(text) for text in texts)
    if longest > MAX_TEXT_CHARS:
        raise InvalidInput(f"a text has {longest} characters; at most {MAX_TEXT_CHARS} (longer inputs are truncated "
                           "to the model's max_length anyway: send less)")
    size = sum(len(text.encode("utf-8")) for text in texts)
    if size > max_bytes:
        raise InvalidInput(f"texts are {size} bytes, above max_input_bytes ({max_bytes})")
    return list(texts)


def _check_images(images: Any, max_bytes: int) -> list[str]:
    if not isinstance(images, list) or not images or not all(isinstance(image, str) for image in images):
        raise InvalidInput("images must be a non-empty list of base64-encoded PNG or JPEG files")
    if len(images) > MAX_IMAGES:
        raise InvalidInput(f"images holds {len(images)} images; at most {MAX_IMAGES} per request")
    size = sum(len(image) for image in images)
    if size > max_bytes:
        raise InvalidInput(f"images are {size} bytes (base64), above max_input_bytes ({max_bytes})")
    for index, image in enumerate(images):
        try:
            raw = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"images[{index}] is not valid base64") from None
        width, height = image_size(raw, f"images[{index}]")
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidInput(f"images[{index}] is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels "
                               "(4096 x 4096) per image")
    return list(images)


def image_size(raw: bytes, what: str = "the image") -> tuple[int, int]:
    """``(width, height)`` from a PNG or JPEG header, without decoding it; ``InvalidInput`` for anything else."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) >= 24 and raw[12:16] == b"IHDR":
        width, height = struct.unpack(">II", raw[16:24])
    elif raw.startswith(b"\xff\xd8"):
        width, height = _jpeg_size(raw, what)
    else:
        raise InvalidInput(f"{what} is neither PNG nor JPEG")
    if width <= 0 or height <= 0:
        raise InvalidInput(f"{what} has an empty size ({width}x{height})")
    return width, height


def _jpeg_size(raw: bytes, what: str) -> tuple[int, int]:
    """The first start-of-frame marker's size (SOF0..SOF15 except DHT, JPG and DAC)."""
    at = 2
    while at + 4 <= len(raw):
        if raw[at] != 0xFF:
            break
        marker = raw[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", raw[at + 2:at + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(raw):
                break
            height, width = struct.unpack(">HH", raw[at + 5:at + 9])
            return width, height
        if length < 2:
            break
        at += 2 + length
    raise InvalidInput(f"{what} is a JPEG without a readable frame header")

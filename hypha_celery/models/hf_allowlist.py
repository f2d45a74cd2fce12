"""Which Hugging Face models the worker accepts: explicit data, importable without torch or transformers.

``ALLOWED[model_type][architecture]`` is the one task that class serves. Each
architecture is the class the installed transformers maps that ``model_type``
to for that task (``MODEL_MAPPING_NAMES`` for feature extraction,
``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``, ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``,
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``); ``tests/unit/test_hf_format.py`` checks
that against the installed package. Only types whose modelling code ships
inside transformers are here: nothing on this list needs ``trust_remote_code``.

Why these: BERT, DistilBERT, RoBERTa, XLM-RoBERTa and MPNet are what embedding
models (sentence-transformers) and text classifiers are published as; Llama,
Mistral, Qwen2 and GPT-2 cover most open causal LMs and their fine-tunes; ViT
is the reference image classifier.
"""

from __future__ import annotations

__all__ = ["ALLOWED", "LORA_TARGET_MODULES", "TASKS", "task_of"]

FEATURE_EXTRACTION = "feature-extraction"
TEXT_CLASSIFICATION = "text-classification"
IMAGE_CLASSIFICATION = "image-classification"
TEXT_GENERATION = "text-generation"
TASKS = (FEATURE_EXTRACTION, TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, TEXT_GENERATION)

ALLOWED: dict[str, dict[str, str]] = {
    "bert": {"BertModel": FEATURE_EXTRACTION, "BertForSequenceClassification": TEXT_CLASSIFICATION},
    "distilbert": {"DistilBertModel": FEATURE_EXTRACTION, "DistilBertForSequenceClassification": TEXT_CLASSIFICATION},
    "roberta": {"RobertaModel": FEATURE_EXTRACTION, "RobertaForSequenceClassification": TEXT_CLASSIFICATION},
    "xlm-roberta": {"XLMRobertaModel": FEATURE_EXTRACTION,
                    "XLMRobertaForSequenceClassification": TEXT_CLASSIFICATION},
    "mpnet": {"MPNetModel": FEATURE_EXTRACTION, "MPNetForSequenceClassification": TEXT_CLASSIFICATION},
    "llama": {"LlamaForCausalLM": TEXT_GENERATION},
    "mistral": {"MistralForCausalLM": TEXT_GENERATION},
    "qwen2": {"Qwen2ForCausalLM": TEXT_GENERATION},
    "gpt2": {"GPT2LMHeadModel": TEXT_GENERATION},
    "vit": {"ViTForImageClassification": IMAGE_CLASSIFICATION},
}

# LoRA's default target modules per model_type (``hypha.train`` ``method: lora`` without
# ``target_modules``): the attention query and value projections, as peft's own defaults.
LORA_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"],
}


def task_of(model_type: object, architecture: object) -> str | None:
    """The task ``architecture`` serves for ``model_type``, or None when the pair is not allowed."""
    if not isinstance(model_type, str) or not isinstance(architecture, str):
        return None
    return ALLOWED.get(model_type, {}).get(architecture)

"""A prompt's token ids for a transformers model: its chat template, the bound on its text, the model's length.

Shared by generation (:mod:`.transformers_generation`) and a proof's replay
(:mod:`.transformers_proofs`), which must tokenize a prompt the same way.
"""

from __future__ import annotations

from hypha_celery.errors import InvalidInput, InvalidTask
from hypha_celery.models.text_inputs import check_text, check_texts
from hypha_celery.runtimes.transformers_loading import TransformerModel
from hypha_celery.work import Prompt

__all__ = ["prompt_ids"]


def prompt_ids(model: TransformerModel, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """A prompt's token ids (chat messages rendered with the model's template), checked against its length."""
    tokenizer = model.tokenizer
    bound = model.text_bound()  # before the tokenizer: validation's checks, once more
    if prompt.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidTask(f"model {model.manifest.id!r} has no chat template: send a prompt, not messages")
        contents = [message.get("content", "") for message in prompt.messages]
        check_texts(contents, "messages' content")
        check_text("".join(contents), "messages' contents together", bound)
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        check_text(prompt.prompt or "", "prompt", bound)
        ids = tokenizer(prompt.prompt)["input_ids"]
    limit = model.max_length or len(ids) + max_new_tokens
    if len(ids) + max_new_tokens > limit:
        raise InvalidInput(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
                           f"exceeds the model's maximum length ({limit} tokens)")
    return list(ids)

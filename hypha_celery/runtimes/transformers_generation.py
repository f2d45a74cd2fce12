"""The transformers runtime's generation: ``hypha.generate`` with transformers' own ``generate``.

No sampling code here: a :class:`_Watch` stopping criterion, called after
every token, notes the first token's time, stops a row on its end-of-sequence
token or a stop string, and reports the text so far. With ``params["proof"]``
the lm head's inputs are captured on the way (:mod:`.transformers_proofs`).
A prompt with ``resume`` tokens (an earlier run's, on a worker that died) has them after its prompt
and goes on for what is left of ``max_new_tokens`` (:func:`_resumable` says when it cannot).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from hypha_celery.errors import InvalidTask, contained
from hypha_celery.formats.huggingface import TEXT_GENERATION
from hypha_celery.runtimes import transformers_proofs
from hypha_celery.runtimes.transformers_adapters import RowAdapters, row_name, selected
from hypha_celery.runtimes.transformers_loading import TransformerModel
from hypha_celery.runtimes.transformers_prompts import prompt_ids
from hypha_celery.structured.grammar import Constraint, ConstraintProcessor, Grammars
from hypha_celery.work import Generate, Generated, Generation, Streamed

__all__ = ["constraint_for", "generate", "visible"]


class _Watch:
    """A transformers ``StoppingCriteria`` (duck-typed: called after each token with the ids so far).

    Per row of the batch it notes where the row ended (its end-of-sequence
    token, or a stop string in its decoded text) and stops that row; it times the
    first token and reports each live row's text at most every ``interval`` seconds, with the token
    ids since its previous report (``sent``: how many of a row's tokens were reported).
    Rows are decoded only when a stop string must be looked for or a report is due.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, indices: Sequence[int], stop: Sequence[str],
                 interval: float, report: Callable[[Streamed], None], before: Sequence[list[int]] | None = None,
                 budgets: Sequence[int] | None = None, delay_s: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.indices = list(indices)
        self.stop = tuple(stop)
        self.interval = interval
        self.report = report
        self.eos = tokenizer.eos_token_id
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.ended_at: list[int | None] = [None] * len(self.indices)
        # A resumed row's completion tokens from an earlier run (inside its input here), and each row's new tokens
        self.before = [list(b) for b in before] if before is not None else [[] for _ in self.indices]
        self.budgets = list(budgets) if budgets is not None else None
        self.sent = [len(b) for b in self.before]
        self.delay_s = delay_s  # the slow-machine test hook (Generate.step_delay_s)
        self._last_report = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.perf_counter()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
        generated = input_ids[:, self.prompt_width:]
        length = int(generated.shape[1])
        due = now - self._last_report >= self.interval
        if due:
            self._last_report = now
        for row, ended in enumerate(self.ended_at):
            if ended is not None:
                continue
            if self.eos is not None and int(generated[row, -1]) == self.eos:
                self.ended_at[row] = length
            if self.budgets is not None and length >= self.budgets[row]:
                self.ended_at[row] = length
            if not (self.stop or due):
                continue
            tokens = self.before[row] + generated[row, :length].tolist()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(stop in text for stop in self.stop):
                self.ended_at[row] = length
            if due:
                self.finish(row, visible(text, self.stop), tokens)
        if self.delay_s:
            time.sleep(self.delay_s)
        return torch.tensor([ended is not None for ended in self.ended_at], dtype=torch.bool, device=input_ids.device)


    def finish(self, row: int, text: str, ids: Sequence[int]) -> None:
        """Report row ``row``'s ``text`` so far and its tokens ``ids`` (all of them; those not yet sent go)."""
        start = self.sent[row]
        self.sent[row] = len(ids)
        self.report(Streamed(text=text, tokens=len(ids), index=self.indices[row], ids=list(ids[start:]), start=start,
                             at=time.time()))

def visible(text: str, stop: Sequence[str]) -> str:
    """What a client may see of unfinished text: a prefix of the final text.

    Cut at a stop string, hold back a tail that may become one, and drop a
    trailing replacement character (a multi-byte character whose bytes are still arriving).
    """
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[:min(cuts)]
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold].rstrip("\ufffd")


def _resumable(model: TransformerModel, resume: Sequence[int] | None, params: dict[str, Any]) -> list[int]:
    """The tokens a static batch row continues after: its earlier run's (``resume``), or none where this path
    cannot continue it exactly (then it generates from the start, and its result says so).

    Not continued: a seeded sampled row (a static batch draws from the process's one generator, so no row's state
    can be restored), a proof (it commits to states this run computes), ids outside the vocabulary, and tokens that
    already end the row (its end-of-sequence token, a stop string, all of ``max_new_tokens``).
    """
    if not resume or params.get("proof") or (params["do_sample"] and params["seed"] is not None):
        return []
    before = list(resume)
    vocab = int(model.module.get_input_embeddings().num_embeddings)
    if len(before) >= params["max_new_tokens"] or not all(isinstance(t, int) and 0 <= t < vocab for t in before):
        return []
    if model.tokenizer.eos_token_id is not None and before[-1] == model.tokenizer.eos_token_id:
        return []
    if any(stop in model.tokenizer.decode(before, skip_special_tokens=True) for stop in params["stop"]):
        return []
    return before


def constraint_for(model: TransformerModel, response_format: dict[str, Any] | None) -> Constraint | None:
    """A row's structured-output constraint on ``model`` (None for plain text); the model keeps its
    :class:`~hypha_celery.structured.grammar.Grammars`, built at the first request that needs one."""
    if response_format is None:
        return None
    if model.grammars is None:
        vocab = int(getattr(model.module.config, "vocab_size", 0) or model.module.get_input_embeddings().num_embeddings)
        eos = model.tokenizer.eos_token_id
        model.grammars = Grammars(model.tokenizer, vocab, [] if eos is None else [eos])
    constraint: Constraint | None = model.grammars.constraint(response_format, model.device)
    return constraint


def generate(model: TransformerModel, request: Generate, report: Callable[[Streamed], None],
             per_prompt: Sequence[TransformerModel] | None = None) -> Generation:
    """Generate for every prompt of ``request`` in one batch with transformers' ``generate``.

    Prompts are left-padded to one width (the attention mask hides the padding),
    so each row's greedy text equals what it generates alone. A prompt that is
    refused (too long, messages without a chat template) gets its error; the
    others still run. ``report`` gets each row's text as it grows. ``per_prompt``:
    each prompt's model when the batch mixes adapters of ``model``'s base.
    """
    with selected(model, per_prompt) as mixed:
        return _generate(model, request, report, per_prompt, mixed)


def _generate(model: TransformerModel, request: Generate, report: Callable[[Streamed], None],
              per_prompt: Sequence[TransformerModel] | None, mixed: RowAdapters | None) -> Generation:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    if model.task != TEXT_GENERATION:
        raise InvalidTask(f"model {model.manifest.id!r} does not generate text ({model.task})")
    params = request.params
    tokenizer = model.tokenizer
    outputs: list[Generated | Exception | None] = [None] * len(request.prompts)
    rows: list[tuple[int, list[int]]] = []
    constraints: list[Constraint | None] = []
    resumed: list[list[int]] = []
    for index, prompt in enumerate(request.prompts):
        try:
            ids = prompt_ids(model, prompt, params["max_new_tokens"])
            constraint = constraint_for(model, prompt.response_format)
            before = _resumable(model, prompt.resume, params)
            if before and constraint is not None:  # its grammar has seen the resumed tokens
                for token in before:
                    constraint.advance(token)
                if constraint.done:  # they complete its JSON already: start over, with a fresh constraint
                    constraint, before = constraint_for(model, prompt.response_format), []
            rows.append((index, ids + before))
            constraints.append(constraint)
            resumed.append(before)
        except BaseException as exc:  # refused, or what the tokenizer raised (a panic too): this prompt fails alone
            if not contained(exc):
                raise
            outputs[index] = exc if isinstance(exc, Exception) else RuntimeError(f"{type(exc).__name__}: {exc}")
    if not rows:
        return Generation([o for o in outputs if o is not None], 0.0, 0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(ids) for _, ids in rows)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in rows])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in rows])
    sampling = {key: params[key] for key in ("temperature", "top_p", "top_k")} if params["do_sample"] else {}
    budgets = [params["max_new_tokens"] - len(before) for before in resumed]
    config = GenerationConfig(
        max_new_tokens=max(budgets), do_sample=params["do_sample"],
        repetition_penalty=params["repetition_penalty"], pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id, **sampling,
    )
    if params["seed"] is not None:
        torch.manual_seed(params["seed"])
    watch = _Watch(tokenizer, width, [index for index, _ in rows], params["stop"], request.progress_interval, report,
                   resumed, budgets if any(resumed) else None, request.step_delay_s)
    if mixed is not None and per_prompt is not None:
        mixed.rows = [row_name(per_prompt[index]) for index, _ in rows]
    processors = LogitsProcessorList([ConstraintProcessor(constraints, width)]) if any(constraints) else None
    started = time.perf_counter()
    with ExitStack() as stack:
        states = stack.enter_context(transformers_proofs.capture(model)) if params.get("proof") else None
        with torch.inference_mode():
            output = model.module.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                generation_config=config, stopping_criteria=StoppingCriteriaList([watch]),
                logits_processor=processors,
            )
    compute_s = time.perf_counter() - started
    kept = [output[row, width:][:watch.ended_at[row]] if watch.ended_at[row] is not None else output[row, width:]
            for row in range(len(rows))]
    proved = transformers_proofs.prove_rows(model, states, [new.tolist() for new in kept]) if states is not None else None
    for row, (index, ids) in enumerate(rows):
        before = resumed[row]
        new = kept[row][:budgets[row]]
        tokens = before + new.tolist()
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in params["stop"] if stop in text]
        if cuts:
            text = text[:min(cuts)]
        length = len(tokens) >= params["max_new_tokens"] and not cuts and (
            tokenizer.eos_token_id is None or tokens[-1] != tokenizer.eos_token_id)
        outputs[index] = Generated(text=text, finish_reason="length" if length else "stop",
                                   prompt_tokens=len(ids) - len(before), completion_tokens=len(tokens),
                                   proof=proved[row] if proved else None, resumed_from=len(before))
        watch.finish(row, text, tokens)  # the final text, and the tokens since the last report
    first = watch.first_token_s if watch.first_token_s is not None else compute_s
    return Generation([o for o in outputs if o is not None], first, compute_s)

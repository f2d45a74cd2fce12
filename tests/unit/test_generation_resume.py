"""A generation continued after an earlier run's tokens (its worker died): the serving engine on the tiny Llama.

The uninterrupted run is the reference: a resumed row must end with the same tokens, text and finish, and a
seeded sampled row must draw what the uninterrupted row drew, given the generator state after its last token.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from hypha_celery.errors import InvalidInput
from hypha_celery.runtimes import transformers as transformers_runtime
from hypha_celery.serving.engine import Engine
from hypha_celery.serving.request import Finish, Handle, Request, Sampling
from tests.unit.test_continuous_batching import PROMPTS, ids

SAMPLED = Sampling(do_sample=True, temperature=0.9, top_p=0.95, top_k=30, seed=11)


@pytest.fixture(scope="module")
def model(tiny_llama: transformers_runtime.TransformerModel) -> transformers_runtime.TransformerModel:
    return tiny_llama


def run(model: transformers_runtime.TransformerModel, *requests: Request) -> list[Handle]:
    eng = Engine(model.module, model.tokenizer)
    handles = [eng.add(request) for request in requests]
    eng.run()
    return handles


def states_at(model: transformers_runtime.TransformerModel, request: Request, at: set[int]) -> tuple[Handle, dict]:
    """Run ``request`` uninterrupted, noting its generator state (``Engine.rng_of``) after each count in ``at``."""
    eng = Engine(model.module, model.tokenizer)
    states: dict[int, str | None] = {}

    def seen(handle: Handle, token: int, delta: str) -> None:
        if len(handle.tokens) in at:
            states[len(handle.tokens)] = eng.rng_of(handle)

    handle = eng.add(Request(request.prompt_ids, request.max_new_tokens, request.sampling, request.stop,
                             on_token=seen))
    eng.run()
    return handle, states


@pytest.mark.parametrize("seam", [1, 17, 59])
def test_a_greedy_row_resumed_at_any_token_ends_as_the_uninterrupted_run(model, seam: int) -> None:
    # Given a greedy generation of 60 tokens, run uninterrupted
    prompt = ids(model, PROMPTS[1])
    (full,) = run(model, Request(prompt, 60))
    assert len(full.tokens) == 60
    # When another engine continues it after its first `seam` tokens
    (resumed,) = run(model, Request(prompt, 60, resume=tuple(full.tokens[:seam])))
    # Then it ends with the same tokens, text and finish, and its tokens start with the resumed ones
    assert resumed.tokens == full.tokens
    assert resumed.text == full.text and resumed.finish is full.finish is Finish.LENGTH
    assert not resumed.reseeded


def test_a_seeded_sampled_row_resumed_with_its_generator_state_draws_what_it_would_have(model) -> None:
    # Given a seeded sampled generation and its generator state after 23 tokens
    prompt = ids(model, PROMPTS[0])
    full, states = states_at(model, Request(prompt, 50, SAMPLED), {23})
    assert states[23] is not None and states[23].startswith("cpu:")
    # When it is continued after those tokens with that state
    (resumed,) = run(model, Request(prompt, 50, SAMPLED, resume=tuple(full.tokens[:23]), rng=states[23]))
    # Then it draws the same tokens as the uninterrupted run
    assert resumed.tokens == full.tokens and resumed.text == full.text and not resumed.reseeded
    # And without the state it would have drawn others (the state is what carries it)
    (fresh,) = run(model, Request(prompt, 50, SAMPLED, resume=tuple(full.tokens[:23])))
    assert fresh.reseeded and fresh.tokens[:23] == full.tokens[:23] and fresh.tokens != full.tokens


def cpu_state_of_length(n: int) -> str:
    return "cpu:" + base64.b64encode(bytes(n)).decode()


@pytest.mark.parametrize("rng", ["cuda:AAAAAAAAAAAAAAAAAAAAAA==", "cpu:not base64!", cpu_state_of_length(100),
                                 "cpu:" + "A" * 20_000, "", "nonsense"])
def test_a_generator_state_that_is_not_this_devices_is_reseeded_never_trusted(model, rng: str) -> None:
    # Given a resumed seeded row whose state is another device kind's, malformed, truncated or oversized
    prompt = ids(model, PROMPTS[0])
    (full,) = run(model, Request(prompt, 30, SAMPLED))
    # When it continues
    (resumed,) = run(model, Request(prompt, 30, SAMPLED, resume=tuple(full.tokens[:10]), rng=rng))
    # Then it goes on, seeded afresh from its seed and the seam (so the same twice), and says so
    (again,) = run(model, Request(prompt, 30, SAMPLED, resume=tuple(full.tokens[:10]), rng=rng))
    assert resumed.reseeded and resumed.finish is Finish.LENGTH and len(resumed.tokens) == 30
    assert resumed.tokens[:10] == full.tokens[:10] and resumed.tokens == again.tokens


def test_a_stop_string_across_the_seam_stops_the_resumed_row_where_it_would_have(model) -> None:
    # Given a greedy completion and a stop string whose first occurrence spans token 20's seam
    prompt = ids(model, PROMPTS[3])
    (free,) = run(model, Request(prompt, 60))
    before = model.tokenizer.decode(free.tokens[:20], skip_special_tokens=True)
    stop = free.text[len(before) - 2:len(before) + 3]
    assert free.text.find(stop) == len(before) - 2, "the stop string must first occur across the seam"
    (whole,) = run(model, Request(prompt, 60, stop=(stop,)))
    # When the row is continued after 20 tokens with that stop string
    (resumed,) = run(model, Request(prompt, 60, stop=(stop,), resume=tuple(free.tokens[:20])))
    # Then it stops where the uninterrupted run stopped, its text cut at the stop
    assert whole.finish is Finish.STOP and resumed.finish is Finish.STOP
    assert resumed.text == whole.text == free.text[:len(before) - 2]
    assert resumed.tokens == whole.tokens


def test_resumed_tokens_that_already_end_the_row_end_it_at_once(model, monkeypatch) -> None:
    prompt = ids(model, PROMPTS[2])
    (full,) = run(model, Request(prompt, 12))
    eng = Engine(model.module, model.tokenizer)
    # Given every token of a finished run (its worker died before the task ended), then one that ends on an EOS
    done = eng.add(Request(prompt, 12, resume=tuple(full.tokens)))
    monkeypatch.setattr(model.module.generation_config, "eos_token_id", full.tokens[4])
    stopped = Engine(model.module, model.tokenizer).add(Request(prompt, 12, resume=tuple(full.tokens[:5])))
    # Then each is done when added, without a step: its length reached, or its end-of-sequence token
    assert done.done and done.finish is Finish.LENGTH and done.text == full.text and not eng.busy
    assert stopped.done and stopped.finish is Finish.STOP and stopped.tokens == full.tokens[:5]


@pytest.mark.parametrize(("resume", "message"), [((10**9,), "resumed completion's token ids"),
                                                 ((-1,), "resumed completion's token ids"),
                                                 (tuple([5] * 13), "longer than max_new_tokens")])
def test_a_resumed_completion_outside_the_vocabulary_or_too_long_is_refused_alone(model, resume: tuple,
                                                                                  message: str) -> None:
    eng = Engine(model.module, model.tokenizer)
    with pytest.raises(InvalidInput, match=message):
        eng.add(Request(ids(model, PROMPTS[0]), 12, resume=resume))
    assert not eng.busy


def test_resumed_rows_of_one_dead_batch_continue_together_with_fresh_rows(model) -> None:
    # Given four generations (greedy and seeded sampled) that ran uninterrupted, with states at their seams
    plan: list[tuple[list[int], Sampling, int]] = [(ids(model, PROMPTS[i]), sampling, seam) for i, sampling, seam in
                                                   [(0, Sampling(), 7), (1, SAMPLED, 13), (3, Sampling(), 29),
                                                    (4, Sampling(do_sample=True, top_k=0, seed=3), 2)]]
    references: list[tuple[Handle, Any]] = [states_at(model, Request(p, 40, s), {seam}) for p, s, seam in plan]
    # When they are continued in one engine, each from its own seam, beside a fresh row
    requests = [Request(p, 40, s, resume=tuple(ref.tokens[:seam]), rng=states.get(seam))
                for (p, s, seam), (ref, states) in zip(plan, references, strict=True)]
    fresh_prompt = ids(model, PROMPTS[2])
    *resumed, fresh = run(model, *requests, Request(fresh_prompt, 40))
    # Then each row ends as it would have uninterrupted, and the fresh row as it would alone
    assert [h.tokens for h in resumed] == [ref.tokens for ref, _ in references]
    assert fresh.tokens == run(model, Request(fresh_prompt, 40))[0].tokens

"""The continuous-batching engine (hypha_celery/serving) on the tiny Llama: rows join and leave at any step,
yet each row's tokens are what it would produce alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from hypha_celery.errors import InvalidInput
from hypha_celery.runtimes import transformers as transformers_runtime
from hypha_celery.serving.engine import Engine
from hypha_celery.serving.request import Finish, Handle, Request, Sampling, State, kv_bytes_per_token, kv_tokens

PROMPTS = ("hello there", "the quick brown fox jumps over the lazy dog", "a",
           "one two three four five six seven eight nine ten eleven twelve", "why")


@pytest.fixture(scope="module")
def model(tiny_llama: transformers_runtime.TransformerModel) -> transformers_runtime.TransformerModel:
    return tiny_llama


def ids(model: transformers_runtime.TransformerModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


def alone(model: transformers_runtime.TransformerModel, prompt: list[int], max_new_tokens: int,
          seed: int | None = None, **settings: Any) -> list[int]:
    """What transformers' own ``generate`` produces for ``prompt`` alone (a batch of one, no padding)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.module.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, **settings)
    return [int(t) for t in out[0, len(prompt):]]


def engine(model: transformers_runtime.TransformerModel, **kwargs: Any) -> Engine:
    return Engine(model.module, model.tokenizer, **kwargs)


def run_staggered(eng: Engine, requests: list[tuple[int, Request]]) -> list[Handle]:
    """Add each request at its step (joins mid-batch), step until all are done; handles in request order."""
    handles: dict[int, Handle] = {}
    step = 0
    while len(handles) < len(requests) or eng.busy:
        for index, (at, request) in enumerate(requests):
            if at == step:
                handles[index] = eng.add(request)
        eng.step()
        step += 1
    return [handles[i] for i in range(len(requests))]


def test_greedy_rows_are_token_identical_to_generate_alone_whatever_joins_and_leaves(
        model: transformers_runtime.TransformerModel) -> None:
    # Given prompts of different lengths and lengths to generate, arriving at different steps, with a small
    # prefill budget so long prompts enter in chunks while other rows decode
    plan = [(0, 40), (0, 5), (3, 25), (4, 12), (9, 30)]
    prompts = [ids(model, p) for p in PROMPTS]
    requests = [(at, Request(prompts[i], n)) for i, (at, n) in enumerate(plan)]
    # When they run through one engine
    handles = run_staggered(engine(model, prefill_budget=6), requests)
    # Then each row's tokens are what generate gives it alone, and it left when it was done
    for (_, request), handle in zip(requests, handles, strict=True):
        assert handle.tokens == alone(model, list(request.prompt_ids), request.max_new_tokens, do_sample=False)
        assert handle.finish is Finish.LENGTH and handle.state is State.DONE


def test_a_greedy_row_with_a_repetition_penalty_matches_generate_alone(
        model: transformers_runtime.TransformerModel) -> None:
    # Given a penalised greedy row sharing the batch with plain greedy rows
    prompt = ids(model, PROMPTS[1])
    eng = engine(model)
    penalised = eng.add(Request(prompt, 30, Sampling(repetition_penalty=1.3)))
    others = [eng.add(Request(ids(model, p), 20)) for p in PROMPTS[2:]]
    # When the batch runs
    eng.run()
    # Then the penalty applied to its own prompt and completion only, as generate's processor does alone
    assert penalised.tokens == alone(model, prompt, 30, do_sample=False, repetition_penalty=1.3)
    assert penalised.tokens != alone(model, prompt, 30, do_sample=False)
    assert all(h.finish is Finish.LENGTH for h in others)


def test_a_seeded_sampled_row_repeats_its_tokens_whatever_shares_its_batch(
        model: transformers_runtime.TransformerModel) -> None:
    # Given a seeded sampled request
    prompt = ids(model, PROMPTS[0])
    settings = Sampling(do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    first = engine(model)
    solo = first.add(Request(prompt, 25, settings))
    first.run()
    # When it runs again among unseeded sampled rows and greedy rows that join and leave around it
    crowd = [(0, Request(ids(model, PROMPTS[1]), 10, Sampling(do_sample=True, temperature=1.5))),
             (0, Request(prompt, 25, settings)),
             (2, Request(ids(model, PROMPTS[3]), 8)),
             (5, Request(ids(model, PROMPTS[4]), 30, Sampling(do_sample=True, top_k=5)))]
    shared = run_staggered(engine(model, prefill_budget=4), crowd)[1]
    # Then it draws the same tokens, and the same that transformers' generate draws alone after manual_seed(7)
    assert shared.tokens == solo.tokens
    assert solo.tokens == alone(model, prompt, 25, seed=7, do_sample=True, temperature=0.8, top_p=0.9, top_k=20)
    other_seed = engine(model)
    different = other_seed.add(Request(prompt, 25, Sampling(do_sample=True, temperature=0.8, top_p=0.9, top_k=20,
                                                               seed=8)))
    other_seed.run()
    assert different.tokens != solo.tokens


def test_mixed_settings_in_one_batch_each_follow_their_own(model: transformers_runtime.TransformerModel) -> None:
    # Given greedy, penalised, hot-sampled and narrow-sampled rows in one batch
    rows: list[tuple[list[int], int, dict[str, Any], Sampling]] = [
        (ids(model, PROMPTS[0]), 20, {"do_sample": False}, Sampling()),
        (ids(model, PROMPTS[1]), 15, {"do_sample": False, "repetition_penalty": 1.5}, Sampling(repetition_penalty=1.5)),
        (ids(model, PROMPTS[2]), 18, {"do_sample": True, "temperature": 1.7, "top_k": 0},
         Sampling(do_sample=True, temperature=1.7, top_k=0, seed=3)),
        (ids(model, PROMPTS[3]), 12, {"do_sample": True, "temperature": 0.5, "top_p": 0.5, "top_k": 50},
         Sampling(do_sample=True, temperature=0.5, top_p=0.5, seed=4)),
    ]
    eng = engine(model)
    handles = [eng.add(Request(prompt, n, sampling)) for prompt, n, _, sampling in rows]
    # When they decode together
    eng.run()
    # Then each row's tokens are its own settings' tokens alone (sampled rows: generate after manual_seed(seed))
    for (prompt, n, settings, sampling), handle in zip(rows, handles, strict=True):
        assert handle.tokens == alone(model, prompt, n, seed=sampling.seed, **settings)


def test_stop_strings_end_only_their_row_and_cut_its_text(model: transformers_runtime.TransformerModel) -> None:
    # Given a row whose greedy text (alone) holds a string some tokens in, used as that row's stop string
    prompt = ids(model, PROMPTS[1])
    full = model.tokenizer.decode(alone(model, prompt, 40, do_sample=False), skip_special_tokens=True)
    stop = full[10:13]
    assert full.find(stop) >= 1
    streamed: list[str] = []
    eng = engine(model)
    stopped = eng.add(Request(prompt, 40, stop=(stop, "never appears"),
                              on_token=lambda h, token, delta: streamed.append(delta)))
    free = eng.add(Request(prompt, 40))
    # When both run in one batch
    eng.run()
    # Then the stopped row ends at the stop with its text cut before it, its stream adding up to that text,
    # and its neighbour (same prompt, no stop) runs on to its length
    assert stopped.finish is Finish.STOP and stopped.text == full[:full.find(stop)]
    assert "".join(streamed) == stopped.text and len(streamed) == len(stopped.tokens)
    assert len(stopped.tokens) < 40
    assert free.finish is Finish.LENGTH and free.tokens == alone(model, prompt, 40, do_sample=False)


def test_the_end_of_sequence_token_ends_a_row_as_generate_does(model: transformers_runtime.TransformerModel,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an end-of-sequence id that the row's greedy completion reaches a few tokens in
    prompt = ids(model, PROMPTS[0])
    tokens = alone(model, prompt, 30, do_sample=False)
    eos = tokens[6]
    monkeypatch.setattr(model.module.generation_config, "eos_token_id", eos)
    eng = engine(model)
    ended = eng.add(Request(prompt, 30))
    longer = eng.add(Request(ids(model, PROMPTS[3]), 30))
    # When it runs beside another row
    eng.run()
    # Then it stops on that token (kept, as generate keeps it) while the other goes on
    assert ended.finish is Finish.STOP
    assert ended.tokens == alone(model, prompt, 30, do_sample=False) == tokens[:tokens.index(eos) + 1]
    assert longer.tokens == alone(model, ids(model, PROMPTS[3]), 30, do_sample=False)


def test_a_row_joins_at_the_next_step_and_leaves_the_step_it_finishes(
        model: transformers_runtime.TransformerModel) -> None:
    # Given a long row decoding
    eng = engine(model)
    long = eng.add(Request(ids(model, PROMPTS[3]), 20))
    eng.step()
    assert eng.running() == [long] and len(long.tokens) == 1
    # When a short row is added
    short = eng.add(Request(ids(model, PROMPTS[0]), 3))
    # Then it is waiting until the next step, which prefills it (its first token) and decodes the long row
    assert short.state is State.WAITING and eng.running() == [long]
    eng.step()
    assert eng.running() == [long, short] and (len(long.tokens), len(short.tokens)) == (2, 1)
    # And it leaves at the step it produces its third token, the long row decoding on
    eng.step()
    left = eng.step()
    assert left == [short] and short.finish is Finish.LENGTH and eng.running() == [long]
    eng.run()
    assert long.tokens == alone(model, ids(model, PROMPTS[3]), 20, do_sample=False)


def test_the_batch_cache_narrows_when_its_longest_row_leaves(model: transformers_runtime.TransformerModel) -> None:
    # Given a long prompt with a short completion and a short prompt with a longer one
    eng = engine(model)
    eng.add(Request(ids(model, PROMPTS[3] * 3), 2))
    kept = eng.add(Request(ids(model, PROMPTS[4]), 10))
    while not kept.tokens:
        eng.step()
    assert len(eng.running()) == 2
    wide = eng._kv.width
    # When the long prompt's row leaves
    while len(eng.running()) > 1:
        eng.step()
    # Then the padding it imposed is dropped: the width is the remaining row's own length
    assert eng._kv.width < wide and eng._kv.width == len(kept.request.prompt_ids) + len(kept.tokens) - 1


def test_a_long_prompt_enters_in_chunks_while_running_rows_keep_decoding(
        model: transformers_runtime.TransformerModel) -> None:
    # Given a forward that records how many prompt tokens each pass carries, and a row already decoding
    sizes: list[tuple[int, int]] = []
    real = model.module

    class Spy:
        config = real.config
        generation_config = real.generation_config

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def __call__(self, **inputs: Any) -> Any:
            sizes.append(tuple(inputs["input_ids"].shape))
            return real(**inputs)

    eng = Engine(Spy(), model.tokenizer, prefill_budget=8)
    running = eng.add(Request(ids(model, PROMPTS[0]), 30))
    eng.step()
    long_prompt = ids(model, " ".join([PROMPTS[3]] * 4))
    assert len(long_prompt) > 4 * 8
    # When a long prompt joins
    joining = eng.add(Request(long_prompt, 5))
    steps = 0
    while not joining.tokens:
        before = len(running.tokens)
        eng.step()
        steps += 1
        # Then every step still gave the running row its token, and no pass held more than the budget of prompt
        assert len(running.tokens) == before + 1
    assert steps >= len(long_prompt) // 8
    assert all(rows * width <= 8 for rows, width in sizes[1:] if width > 1)
    eng.run()
    assert joining.tokens == alone(model, long_prompt, 5, do_sample=False)
    assert running.tokens == alone(model, ids(model, PROMPTS[0]), 30, do_sample=False)


def refusing_neighbour(kind: str) -> tuple[dict[str, Any], Callable[[Engine, list[int]], Handle | None]]:
    """An engine option and an add that makes one row fail in the way ``kind`` names."""
    def fail(handle: Handle, token: int, delta: str) -> None:
        if len(handle.tokens) == 4:
            raise RuntimeError("the client went away")

    if kind == "bad input":
        def add(eng: Engine, prompt: list[int]) -> Handle | None:
            with pytest.raises(InvalidInput, match="token ids"):
                eng.add(Request([*prompt, 10**9], 10))
            return None
        return {}, add
    if kind == "callback":
        return {}, lambda eng, prompt: eng.add(Request(prompt, 10, on_token=fail))
    if kind == "join hook":
        def join(handle: Handle) -> bool:
            if handle.request.tag == "refuse":
                raise MemoryError("no KV memory left for it")
            return True
        return {"on_join": join}, lambda eng, prompt: eng.add(Request(prompt, 10, tag="refuse"))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bad input", "callback", "join hook"])
def test_a_failing_row_fails_alone(model: transformers_runtime.TransformerModel, kind: str) -> None:
    # Given rows decoding and a row that fails (refused input, its callback raising, its admission refused)
    options, add_failing = refusing_neighbour(kind)
    eng = engine(model, **options)
    prompts = [ids(model, p) for p in PROMPTS[:3]]
    handles = [eng.add(Request(p, 15)) for p in prompts]
    eng.step()
    eng.step()
    # When the failing row is added mid-batch
    failing = add_failing(eng, prompts[1])
    eng.run()
    # Then it ends in error alone, and its neighbours' tokens are what they are alone
    if failing is not None:
        assert failing.finish is Finish.ERROR and failing.error is not None
    for prompt, handle in zip(prompts, handles, strict=True):
        assert handle.finish is Finish.LENGTH and handle.tokens == alone(model, prompt, 15, do_sample=False)


def test_a_cancelled_row_leaves_and_its_neighbours_are_undisturbed(
        model: transformers_runtime.TransformerModel) -> None:
    # Given three rows decoding
    eng = engine(model)
    prompts = [ids(model, p) for p in PROMPTS[:3]]
    handles = [eng.add(Request(p, 20)) for p in prompts]
    for _ in range(5):
        eng.step()
    # When the middle one is cancelled
    eng.cancel(handles[1])
    left = eng.step()
    # Then it leaves at that step with what it had, and the others finish as if alone
    assert handles[1] in left and handles[1].finish is Finish.CANCELLED and len(handles[1].tokens) == 5
    eng.run()
    for i in (0, 2):
        assert handles[i].tokens == alone(model, prompts[i], 20, do_sample=False)


def test_join_and_leave_hooks_see_each_row_once_and_may_defer_a_join(
        model: transformers_runtime.TransformerModel) -> None:
    # Given hooks that record joins and leaves, and refuse the second request's join until the first has left
    # (as a KV ledger with room for one would)
    joined: list[int] = []
    released: list[int] = []

    def join(handle: Handle) -> bool:
        if len(joined) > len(released):
            return False
        joined.append(handle.id)
        return True

    eng = engine(model, on_join=join, on_leave=lambda h: released.append(h.id))
    first = eng.add(Request(ids(model, PROMPTS[0]), 6))
    second = eng.add(Request(ids(model, PROMPTS[1]), 4))
    # When both run
    eng.run()
    # Then each joined once and left once, the second only after the first had left, both complete
    assert joined == released == [first.id, second.id]
    assert first.tokens == alone(model, list(first.request.prompt_ids), 6, do_sample=False)
    assert second.tokens == alone(model, list(second.request.prompt_ids), 4, do_sample=False)


def test_kv_tokens_is_what_a_row_can_hold(model: transformers_runtime.TransformerModel) -> None:
    # Given a request; Then its KV need is its prompt plus its completion, at the model's bytes per token
    request = Request(ids(model, PROMPTS[1]), 50)
    assert kv_tokens(request) == len(request.prompt_ids) + 50
    config = model.module.config
    assert kv_bytes_per_token(config, 4) == 2 * config.num_hidden_layers * config.num_key_value_heads * 16 * 4


@pytest.mark.parametrize(("request_kwargs", "named"), [
    ({"prompt_ids": [], "max_new_tokens": 3}, "at least one token"),
    ({"prompt_ids": [-1], "max_new_tokens": 3}, "token ids"),
    ({"prompt_ids": [5], "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt_ids": [5], "max_new_tokens": 10_000}, "maximum length"),
    ({"prompt_ids": [5], "max_new_tokens": 3, "stop": ("",)}, "stop"),
    ({"prompt_ids": [5], "max_new_tokens": 3, "sampling": Sampling(temperature=0.0)}, "temperature"),
    ({"prompt_ids": [5], "max_new_tokens": 3, "sampling": Sampling(top_p=0.0)}, "top_p"),
    ({"prompt_ids": [5], "max_new_tokens": 3, "sampling": Sampling(seed=-2)}, "seed"),
])
def test_a_bad_request_is_refused_before_it_enters(model: transformers_runtime.TransformerModel,
                                                   request_kwargs: dict[str, Any], named: str) -> None:
    eng = engine(model)
    with pytest.raises(InvalidInput, match=named):
        eng.add(Request(**request_kwargs))
    assert not eng.busy


def test_a_failed_forward_pass_fails_the_rows_in_it_and_the_engine_serves_on(
        model: transformers_runtime.TransformerModel) -> None:
    from hypha_celery.errors import ExecutionError

    # Given a forward that fails once, on the third pass
    real = model.module
    calls = [0]

    class Flaky:
        config = real.config
        generation_config = real.generation_config

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def __call__(self, **inputs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(**inputs)

    eng = Engine(Flaky(), model.tokenizer)
    first = [eng.add(Request(ids(model, p), 10)) for p in PROMPTS[:2]]
    eng.step()
    eng.step()
    # When the failing pass runs
    with pytest.raises(ExecutionError, match="out of memory"):
        eng.step()
    # Then the rows in it ended in error, and a request added afterwards runs as if alone
    assert all(h.finish is Finish.ERROR and isinstance(h.error, ExecutionError) for h in first)
    later = eng.add(Request(ids(model, PROMPTS[3]), 10))
    eng.run()
    assert later.tokens == alone(model, ids(model, PROMPTS[3]), 10, do_sample=False)

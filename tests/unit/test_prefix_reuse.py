"""Prefix reuse in the continuous-batching engine (hypha_celery/serving/prefix.py): a row whose prompt starts with
cached blocks copies their KV and prefills only the rest, and its tokens are what it produces without the cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from hypha_celery.runtimes import transformers as transformers_runtime
from hypha_celery.serving.engine import Engine
from hypha_celery.serving.prefix import PrefixCache
from hypha_celery.serving.request import Handle, Request, Sampling
from tests.unit.test_continuous_batching import alone, ids, run_staggered

if TYPE_CHECKING:
    import torch

BLOCK = 16
SYSTEM = ("you are a helpful assistant who answers in short sentences and never lies to the user about anything "
          "at all, and when you do not know you say so")
SUFFIXES = ("hello there", "why", "the quick brown fox jumps over the lazy dog", "one two three four five")


@pytest.fixture(scope="module")
def model(tiny_llama: transformers_runtime.TransformerModel) -> transformers_runtime.TransformerModel:
    return tiny_llama


@pytest.fixture(scope="module")
def system(model: transformers_runtime.TransformerModel) -> list[int]:
    prompt = ids(model, SYSTEM)
    assert len(prompt) > 3 * BLOCK and len(prompt) % BLOCK  # several full blocks and a partial one
    return prompt


def block_bytes(model: transformers_runtime.TransformerModel) -> int:
    from hypha_celery.serving.request import kv_bytes_per_token

    return kv_bytes_per_token(model.module.config, 4) * BLOCK


def caching(model: transformers_runtime.TransformerModel, **kwargs: Any) -> Engine:
    options = {"prefix_cache_bytes": 1 << 20, "prefix_block": BLOCK, **kwargs}
    return Engine(model.module, model.tokenizer, **options)


def served(eng: Engine, requests: list[Request]) -> list[Handle]:
    handles = [eng.add(r) for r in requests]
    eng.run()
    return handles


def shared_blocks(a: list[int], b: list[int]) -> int:
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return common // BLOCK * BLOCK


def test_greedy_rows_reusing_a_cached_prefix_are_token_identical_to_generate_alone(
        model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    # Given a cache warmed by one request with the system prompt, and a small prefill budget (the rest is chunked)
    eng = caching(model, prefill_budget=6)
    warm = system + ids(model, SUFFIXES[0])
    first = served(eng, [Request(warm, 12)])[0]
    assert first.cached_tokens == 0 and eng.prefix_bytes == len(warm) // BLOCK * block_bytes(model)
    # When requests sharing it join at different steps, beside a row without it (left padded in the same
    # groups, the reused rows' prompts split around padding) and rows already decoding
    prompts = [system + ids(model, s) for s in SUFFIXES[1:]] + [ids(model, SUFFIXES[2] * 3)]
    plan = [(0, 20), (0, 8), (2, 15), (1, 25)]
    handles = run_staggered(eng, [(at, Request(p, n)) for p, (at, n) in zip(prompts, plan, strict=True)])
    # Then the sharing rows skipped the system prompt's full blocks, the other nothing,
    # and every row's tokens are what generate gives it alone
    assert [h.cached_tokens for h in handles] == [shared_blocks(warm, p) for p in prompts]
    assert all(h.cached_tokens >= len(system) // BLOCK * BLOCK for h in handles[:3]) and handles[3].cached_tokens == 0
    for prompt, (_, n), handle in zip(prompts, plan, handles, strict=True):
        assert handle.tokens == alone(model, prompt, n, do_sample=False)


def test_seeded_and_penalised_rows_repeat_their_tokens_with_a_reused_prefix(
        model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    # Given seeded sampled and penalised requests sharing the system prompt, run on an engine without a cache
    settings = [Sampling(do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=7),
                Sampling(do_sample=True, temperature=1.3, top_k=0, seed=11), Sampling(repetition_penalty=1.4)]
    requests = [Request(system + ids(model, s), 20, sampling) for s, sampling in zip(SUFFIXES, settings, strict=False)]
    plain = served(Engine(model.module, model.tokenizer), requests)
    # When they run again on a warmed cache (the penalty still sees the whole prompt)
    eng = caching(model)
    served(eng, [Request(system, 1)])
    reused = served(eng, requests)
    # Then they drew the same tokens
    assert all(h.cached_tokens > 0 for h in reused)
    assert [h.tokens for h in reused] == [h.tokens for h in plain]
    assert reused[0].tokens == alone(model, list(requests[0].prompt_ids), 20, seed=7, do_sample=True,
                                     temperature=0.8, top_p=0.9, top_k=20)


def test_concurrent_requests_sharing_a_new_prefix_compute_it_once(
        model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    # Given an empty cache and four requests sharing the system prompt, added together
    eng = caching(model)
    prompts = [system + ids(model, s) for s in SUFFIXES]
    # When they run
    handles = served(eng, [Request(p, 10) for p in prompts])
    # Then the first computed the shared blocks, the others waited one prefill for them and reused them
    assert [h.cached_tokens for h in handles] == [0] + [shared_blocks(prompts[0], p) for p in prompts[1:]]
    assert all(h.cached_tokens >= len(system) // BLOCK * BLOCK for h in handles[1:])
    for prompt, handle in zip(prompts, handles, strict=True):
        assert handle.tokens == alone(model, prompt, 10, do_sample=False)


def test_a_shared_prefix_shorter_than_a_block_is_not_reused(
        model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    # Given prompts sharing fewer tokens than a block
    short = system[:BLOCK - 3]
    prompts = [short + ids(model, s) for s in SUFFIXES[2:]]
    assert shared_blocks(*prompts) == 0
    eng = caching(model)
    first = served(eng, [Request(prompts[0], 10)])[0]
    # When the second runs after the first
    second = served(eng, [Request(prompts[1], 10)])[0]
    # Then nothing was reused, and both are right
    assert first.cached_tokens == second.cached_tokens == 0
    assert second.tokens == alone(model, prompts[1], 10, do_sample=False)


def test_a_prompt_equal_to_a_cached_prefix_still_feeds_its_last_token(
        model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    # Given a cached prompt, and prompts that are exactly its first blocks, or end inside a block of it
    eng = caching(model)
    served(eng, [Request(system, 1)])
    exact, inside = system[:2 * BLOCK], system[:2 * BLOCK + 5]
    # When they run
    handles = served(eng, [Request(exact, 12), Request(inside, 12), Request(system, 12)])
    # Then the exact one reused all but its last token (its logits come from feeding it), the others their
    # full blocks
    assert [h.cached_tokens for h in handles] == [2 * BLOCK - 1, 2 * BLOCK, len(system) // BLOCK * BLOCK]
    for prompt, handle in zip((exact, inside, system), handles, strict=True):
        assert handle.tokens == alone(model, prompt, 12, do_sample=False)


def test_the_cache_stays_under_its_cap_and_evicts_the_least_recently_used_prefix(
        model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    # Given a cache capped at three blocks and two unrelated prompts of two full blocks each
    size = block_bytes(model)
    eng = caching(model, prefix_cache_bytes=3 * size)
    one = system[:2 * BLOCK + 2]
    two = ids(model, " ".join([SUFFIXES[2]] * 4))[:2 * BLOCK + 2]
    assert len(two) == len(one) and shared_blocks(one, two) == 0
    served(eng, [Request(one, 4)])
    assert eng.prefix_bytes == 2 * size
    # When the second is cached (one of the first's blocks must go: its leaf, the least recently used)
    served(eng, [Request(two, 4)])
    assert eng.prefix_bytes == 3 * size
    # Then the first keeps only its first block, the second both, and outputs are unchanged
    again = served(eng, [Request(two, 6), Request(one, 6)])
    assert [h.cached_tokens for h in again] == [2 * BLOCK, BLOCK]
    assert again[1].tokens == alone(model, one, 6, do_sample=False)
    assert eng.prefix_bytes <= 3 * size


def test_rows_do_not_wait_for_a_neighbours_prefix_that_a_too_small_cache_cannot_keep(
        model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    # Given a cache smaller than one block, which has seen a block already
    eng = caching(model, prefix_cache_bytes=block_bytes(model) - 1)
    served(eng, [Request(system, 1)])
    assert eng.prefix_bytes == 0
    # When requests sharing a prefix are added together
    handles = [eng.add(Request(system + ids(model, s), 5)) for s in SUFFIXES]
    while not eng.running():
        eng.step()
    # Then they prefill together (none waits for blocks that will not be kept), and nothing is reused
    assert eng.running() == handles and all(h.cached_tokens == 0 for h in handles)
    eng.run()
    assert eng.prefix_bytes == 0


def test_a_failing_cache_copy_empties_the_cache_and_the_rows_go_on(
        model: transformers_runtime.TransformerModel, system: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a warm cache whose copies then fail (the device out of memory)
    eng = caching(model)
    served(eng, [Request(system, 1)])
    assert eng.prefix_bytes > 0
    assert eng.prefix_cache is not None

    def out_of_memory(*args: Any) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(eng.prefix_cache, "lookup", out_of_memory)
    monkeypatch.setattr(eng.prefix_cache, "insert", out_of_memory)
    # When requests sharing the prefix run
    prompts = [system + ids(model, s) for s in SUFFIXES[:2]]
    handles = served(eng, [Request(p, 8) for p in prompts])
    # Then they prefilled in full and are right, and the cache was emptied
    assert [h.cached_tokens for h in handles] == [0, 0] and eng.prefix_bytes == 0
    for prompt, handle in zip(prompts, handles, strict=True):
        assert handle.tokens == alone(model, prompt, 8, do_sample=False)


def test_without_a_cache_nothing_is_kept(model: transformers_runtime.TransformerModel, system: list[int]) -> None:
    eng = Engine(model.module, model.tokenizer)
    handles = served(eng, [Request(system, 3), Request(system, 3)])
    assert eng.prefix_cache is None and eng.prefix_bytes == 0 and [h.cached_tokens for h in handles] == [0, 0]


# -- the cache alone, on made-up tensors ------------------------------------------------------------------------


def kv(prompt: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One layer of made-up KV whose value at a position is its token, behind two columns of padding."""
    import torch

    keys = torch.tensor([0.0, 0.0] + [float(t) for t in prompt]).reshape(1, -1, 1)
    return [(keys, -keys)], torch.arange(2, 2 + len(prompt))


def test_lookup_returns_the_longest_cached_prefix_in_prompt_order() -> None:
    cache = PrefixCache(capacity=1 << 10, block=4)
    prompt = list(range(10, 21))
    cache.insert(prompt, *kv(prompt))
    assert len(cache) == 2 and cache.bytes == 2 * 2 * 4 * 4
    found = cache.lookup([*prompt[:6], 99, 98, 97])
    assert found is not None and found[0][0].flatten().tolist() == [float(t) for t in prompt[:4]]
    found = cache.lookup(prompt[:8])
    assert found is not None and found[0][1].flatten().tolist() == [-float(t) for t in prompt[:7]]
    assert cache.lookup(prompt[:3]) is None and cache.lookup([1, 2, 3, 4, 5]) is None
    assert cache.hits == 4 + 7


def test_eviction_takes_the_least_recently_used_leaf_and_never_orphans_a_block() -> None:
    cache = PrefixCache(capacity=3 * 32, block=4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12]
    cache.insert(a, *kv(a))
    cache.insert(b, *kv(b))
    assert cache.lookup([*a[:4], 0]) is not None  # a's first block is now used more recently than b
    c = [13, 14, 15, 16]
    cache.insert(c, *kv(c))
    # a's second block (a leaf, older than its parent) went first
    assert cache.cached_blocks(a) == 1 and cache.cached_blocks(b) == 1 and cache.cached_blocks(c) == 1
    longer = [*c, 17, 18, 19, 20]
    cache.insert(longer, *kv(longer))
    assert cache.bytes <= cache.capacity and cache.cached_blocks(longer) == 2
    assert all(cache.cached_blocks(p) in (0, 1) for p in (a, b))


def test_a_block_larger_than_the_cap_is_not_cached() -> None:
    cache = PrefixCache(capacity=16, block=4)
    prompt = [1, 2, 3, 4]
    cache.insert(prompt, *kv(prompt))
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError):
        PrefixCache(capacity=-1)

"""The serving executor's batching policy, without processes or threads: a hand-driven clock decides
when a batch is due, and plain strings stand in for the pool's requests."""

from __future__ import annotations

import pytest

from hypha_celery import errors
from hypha_celery.executor.batching import (
    BatchKey,
    BatchLimits,
    BatchPolicy,
    BatchQueue,
    by_model,
    generation_key,
    infer_key,
    mixed_models,
    retry_groups,
)

MLP = infer_key("mlp", None, batchable=True)
CNN = infer_key("cnn", None, batchable=True)


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def queue(clock: Clock, max_size: int = 4, max_delay_s: float = 0.5) -> BatchQueue[str]:
    return BatchQueue(BatchPolicy.uniform(max_size, max_delay_s), clock)


def test_an_empty_queue_has_nothing_due() -> None:
    # Given an empty queue, Then no batch is due and nothing is queued
    assert queue(Clock()).due_in() is None and len(queue(Clock())) == 0


def test_a_lone_request_waits_for_the_delay_then_leaves() -> None:
    # Given one batchable request
    clock = Clock()
    q = queue(clock)
    q.push("a", MLP)
    # Then it waits for others for the whole delay, less the time already passed
    assert q.due_in() == pytest.approx(0.5)
    clock.now += 0.2
    assert q.due_in() == pytest.approx(0.3)
    # When the delay has passed, Then its batch is due, and holds it alone
    clock.now += 0.3
    assert q.due_in() == pytest.approx(0.0)
    assert q.pop() == ["a"] and q.due_in() is None


def test_a_full_batch_is_due_before_the_delay() -> None:
    # Given as many requests for one model as a batch holds, arriving at once
    q = queue(Clock(), max_size=3)
    for item in "abc":
        q.push(item, MLP)
    # Then the batch is due now, with no wait for the delay
    assert q.due_in() == 0.0
    assert q.pop() == ["a", "b", "c"]


def test_a_batch_never_exceeds_the_size_cap_and_the_rest_stay_in_order() -> None:
    # Given five requests for one model and a cap of two
    q = queue(Clock(), max_size=2)
    for item in "abcde":
        q.push(item, MLP)
    # When batches are taken, Then each holds at most two, in arrival order
    assert [q.pop(), q.pop(), q.pop()] == [["a", "b"], ["c", "d"], ["e"]]
    assert len(q) == 0


def test_the_delay_counts_from_the_oldest_request_not_the_newest() -> None:
    # Given a request that has waited 0.4 s of a 0.5 s delay
    clock = Clock()
    q = queue(clock)
    q.push("a", MLP)
    clock.now += 0.4
    # When a second one joins, Then the batch is due 0.1 s later, not 0.5 s
    q.push("b", MLP)
    assert q.due_in() == pytest.approx(0.1)


def test_different_models_never_share_a_batch_and_the_oldest_goes_first() -> None:
    # Given requests for two models, interleaved
    q = queue(Clock())
    for item, key in (("m1", MLP), ("c1", CNN), ("m2", MLP), ("c2", CNN)):
        q.push(item, key)
    # Then the first batch is the oldest request's model, the other waits its turn
    assert q.pop() == ["m1", "m2"]
    assert q.pop() == ["c1", "c2"]


def test_requests_of_another_model_do_not_fill_the_head_s_batch() -> None:
    # Given a cap of two: one mlp request, then two cnn requests
    q = queue(Clock(), max_size=2)
    q.push("m1", MLP)
    q.push("c1", CNN)
    q.push("c2", CNN)
    # Then the mlp batch still waits for its delay (the cnn ones do not count towards it)
    assert q.due_in() == pytest.approx(0.5)


def test_a_request_that_cannot_batch_runs_alone_at_once() -> None:
    # Given a model that cannot batch, queued first, and a batchable one behind it
    q = queue(Clock())
    q.push("alone", infer_key("mlp", None, batchable=False))
    q.push("m1", MLP)
    # Then its batch is due now and holds only it
    assert q.due_in() == 0.0
    assert q.pop() == ["alone"]
    # And a later unbatchable request never joins a batchable head's batch
    q.push("alone2", infer_key("mlp", None, batchable=False))
    q.push("m2", MLP)
    assert q.pop() == ["m1", "m2"] and q.pop() == ["alone2"]


def test_adapters_of_one_base_and_the_base_share_a_batch() -> None:
    # Given requests for two adapters of one base and for the base itself
    base, a1, a2 = infer_key("base", "base", True), infer_key("base/a1", "base", True), infer_key("base/a2", "base", True)
    assert base == a1 == a2
    q = queue(Clock())
    for item, key in (("a1", a1), ("b", base), ("a2", a2)):
        q.push(item, key)
    # Then they run as one batch
    assert q.pop() == ["a1", "b", "a2"]


def test_inference_and_generation_of_one_model_never_mix() -> None:
    # Given an inference and a generation on the same model
    assert infer_key("llama", None, True) != generation_key("llama", None, {"max_new_tokens": 2})


def test_generations_share_a_batch_only_with_the_same_sampling_settings() -> None:
    # Given two generations with the same settings (in another key order) and one with other settings
    greedy = generation_key("llama", None, {"max_new_tokens": 2, "do_sample": False})
    same = generation_key("llama", None, {"do_sample": False, "max_new_tokens": 2})
    longer = generation_key("llama", None, {"max_new_tokens": 8, "do_sample": False})
    # Then only the first two may share a batch
    assert greedy == same and greedy != longer


def test_a_seeded_sampled_generation_runs_alone_and_an_unseeded_one_batches() -> None:
    # Given a seeded sampled generation, Then it has no key: its seed must repeat, so it runs alone
    assert generation_key("llama", None, {"do_sample": True, "seed": 7}) is None
    # And a sampled generation without a seed, or a greedy one with a seed, batches
    assert generation_key("llama", None, {"do_sample": True}) is not None
    assert generation_key("llama", None, {"do_sample": False, "seed": 7}) is not None


def test_a_family_name_cannot_collide_with_sampling_settings() -> None:
    # Given a model id that ends like another's settings, Then the keys still differ
    params = {"max_new_tokens": 2}
    assert generation_key("m", None, params) != generation_key('m{"max_new_tokens": 2}', None, {})


def test_each_kind_has_its_own_limits() -> None:
    # Given a policy where generations leave the queue at once and one at a time (as a continuous scheduler
    # would take them) while inference keeps forming batches
    clock = Clock()
    policy = BatchPolicy(infer=BatchLimits(4, 0.5), generate=BatchLimits(1, 0.0))
    q: BatchQueue[str] = BatchQueue(policy, clock)
    g = generation_key("llama", None, {"max_new_tokens": 2})
    q.push("g1", g)
    q.push("g2", g)
    # Then each generation is due at once and alone
    assert q.due_in() == 0.0 and q.pop() == ["g1"] and q.pop() == ["g2"]
    # And inference still waits for its delay
    q.push("m1", MLP)
    assert q.due_in() == pytest.approx(0.5)
    assert policy.limits(None) == BatchLimits(1, 0.0) and policy.limits(MLP) == BatchLimits(4, 0.5)


def test_a_zero_delay_sends_each_batch_at_once() -> None:
    # Given no queue delay, Then a lone batchable request is due immediately
    q = queue(Clock(), max_delay_s=0.0)
    q.push("a", MLP)
    assert q.due_in() == 0.0


def test_a_key_is_a_value() -> None:
    # Given keys built apart with equal fields, Then they are equal (a dict or set may hold them)
    assert BatchKey("infer", "mlp") == MLP and len({MLP, infer_key("mlp", "mlp", True)}) == 1


def test_mixed_models_names_each_row_only_when_models_differ() -> None:
    assert mixed_models(["base", "base"]) is None
    assert mixed_models(["base/a1", "base", "base/a1"]) == ["base/a1", "base", "base/a1"]


def test_by_model_groups_in_order_of_first_request() -> None:
    batch = [("a1", 1), ("b", 2), ("a1", 3), ("a2", 4)]
    assert by_model(batch, lambda r: r[0]) == [[("a1", 1), ("a1", 3)], [("b", 2)], [("a2", 4)]]


def _model(request: tuple[str, int]) -> str:
    return request[0]


@pytest.mark.parametrize("error", [errors.ExecutorCrashed("gone"), errors.MemoryLimitExceeded("over")])
def test_a_batch_that_killed_its_executor_is_retried_one_request_at_a_time(error: errors.HyphaError) -> None:
    # Given a three-request batch whose executor died
    batch = [("mlp", 1), ("mlp", 2), ("mlp", 3)]
    # Then each request runs again alone, so only the one at fault fails
    assert retry_groups(batch, error, _model) == [[("mlp", 1)], [("mlp", 2)], [("mlp", 3)]]
    # And a lone request that killed it is not retried: it fails
    assert retry_groups(batch[:1], error, _model) == []


def test_a_mixed_batch_that_failed_is_retried_one_model_at_a_time() -> None:
    # Given a batch mixing two adapters and the base, which failed (an adapter that cannot attach)
    batch = [("base/a1", 1), ("base", 2), ("base/a1", 3)]
    # Then each model's requests run again as their own batch
    assert retry_groups(batch, errors.UnsupportedModel("no"), _model) == [[("base/a1", 1), ("base/a1", 3)], [("base", 2)]]


def test_a_one_model_batch_that_failed_or_any_batch_that_timed_out_is_not_retried() -> None:
    # Given a one-model batch that failed with its model's error, Then every request gets that error
    assert retry_groups([("mlp", 1), ("mlp", 2)], errors.ExecutionError("bad"), _model) == []
    # And a mixed batch that ran past its deadline is not run again either
    assert retry_groups([("base/a1", 1), ("base", 2)], errors.TaskTimeout("late"), _model) == []

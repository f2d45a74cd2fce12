"""The outer step's trust in deltas: values checked, norms bounded, weights from the scheduler, kwargs by name.

Hostile deltas are planted in a shared folder and in an S3 bucket (moto) with their true sha256, as a
worker that lies would write them; :func:`hypha_celery.training.distributed.outer.gather` is what ``hypha.aggregate``
runs on them before it combines (the full task on real workers is in tests/e2e/test_diloco_e2e.py). And
an inner task's copy leaves the delta its first run wrote, so the sha256 that run reported stays true.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from hypha_celery.config import WorkerConfig
from hypha_celery.errors import InvalidTask
from hypha_celery.models.shared_storage import SharedStorage
from hypha_celery.training.distributed.deltas import combine, save_tensors, shapes_of
from hypha_celery.training.distributed.inner import publish_delta
from hypha_celery.training.distributed.outer import (
    AggregateSpec,
    _bytes_moved,
    _summed,
    _weighted,
    gather,
    validate_aggregate,
)
from hypha_celery.training.distributed.rounds import describe_round, inner_rows, round_entry

JOB, BASE_SHA = "j", "b" * 64
META = {"job": JOB, "round": "1", "base_sha256": BASE_SHA}


def _tensors(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (scale * rng.standard_normal((3, 4))).astype(np.float32),
            "b": (scale * rng.standard_normal(4)).astype(np.float32)}


def _plant(storage: SharedStorage, tmp_path: Path, task: str, tensors: dict[str, np.ndarray],
           samples: int = 4) -> dict[str, Any]:
    """Write ``tensors`` as task ``task``'s delta and return the report its worker would send."""
    path = tmp_path / f"{task}.safetensors"
    save_tensors(tensors, path, META)
    ref = f"jobs/{JOB}/round-1/{task}.safetensors"
    stored = storage.put_file(ref, path)
    return {"job": JOB, "round": 1, "ref": ref, "sha256": stored.sha256, "samples": samples, "worker": f"w-{task}"}


def _spec(storage: SharedStorage, deltas: list[dict[str, Any]], **kwargs: Any) -> AggregateSpec:
    ctx = SimpleNamespace(storage=lambda: storage, config=WorkerConfig())
    return validate_aggregate(ctx, (), {"job": JOB, "round": 1, "base": "m", "deltas": deltas,  # type: ignore[arg-type]
                                        **kwargs})


def _gather(storage: SharedStorage, spec: AggregateSpec, base: dict[str, np.ndarray], tmp_path: Path) -> Any:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return gather(storage, spec, base, BASE_SHA, scratch, max_size=1 << 20)


def _mean(*deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.mean([d[name].astype(np.float64) for d in deltas], axis=0) for name in deltas[0]}


POISONS = {
    "nan": lambda d: {**d, "w": np.full_like(d["w"], np.nan)},
    "inf": lambda d: {**d, "b": np.full_like(d["b"], np.inf)},
    "1e30": lambda d: {name: np.full_like(t, 1e30) for name, t in d.items()},
    "scaled": lambda d: {name: t * 1000 for name, t in d.items()},  # finite, shaped right, 1000x an honest delta
}


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_a_poisoned_minority_is_refused_and_the_rest_is_the_honest_mean(
        storage: SharedStorage, tmp_path: Path, poison: str) -> None:
    # Given a base, two honest deltas (a tenth of the base's scale) and one poisoned, each with its true sha256
    base = _tensors(0)
    honest = [_tensors(1, 0.1), _tensors(2, 0.1)]
    reports = [_plant(storage, tmp_path, f"h{i}", d) for i, d in enumerate(honest)]
    reports.append(_plant(storage, tmp_path, "evil", POISONS[poison](_tensors(3, 0.1))))
    # When the outer step gathers them
    out = _gather(storage, _spec(storage, reports), base, tmp_path)
    # Then the poisoned one is refused with its reason, and what is combined is the honest deltas' mean
    assert [entry["ref"] for entry in out.refused] == [reports[2]["ref"]]
    assert ("NaN or infinite" if poison in ("nan", "inf") else "L2 norm") in out.refused[0]["reason"]
    average = combine([path for _, path, _, _ in out.accepted], [w for *_, w, _ in out.accepted], shapes_of(base))
    for name, value in _mean(*honest).items():
        np.testing.assert_allclose(average[name], value, rtol=1e-6)


def test_a_delta_larger_than_the_base_is_refused_even_when_half_the_round_is_such(
        storage: SharedStorage, tmp_path: Path) -> None:
    # Given two deltas, one honest and one twice the base's scale, within 10x the honest one's norm
    base = _tensors(0)
    reports = [_plant(storage, tmp_path, "h", _tensors(1, 0.5)), _plant(storage, tmp_path, "x", _tensors(2, 2.0))]
    # When gathered with the default bounds
    out = _gather(storage, _spec(storage, reports), base, tmp_path)
    # Then the large one is refused against the base's norm (max_base_norm_ratio 1)
    assert len(out.accepted) == 1 and "max_base_norm_ratio" in out.refused[0]["reason"]
    # And with that bound off, it is accepted
    out = _gather(storage, _spec(storage, reports, max_base_norm_ratio=None), base, tmp_path)
    assert len(out.accepted) == 2 and out.refused == []


def test_weights_come_from_the_scheduler_never_from_the_reported_samples(
        storage: SharedStorage, tmp_path: Path) -> None:
    # Given two honest deltas; one report claims 10^15 samples; the scheduler signed shards of 4 and 12 texts
    base, one, two = _tensors(0), _tensors(1, 0.1), _tensors(2, 0.1)
    reports = [_plant(storage, tmp_path, "t1", one), _plant(storage, tmp_path, "t2", two, samples=10**15)]
    spec = _spec(storage, reports, weights={"t1": 4, "t2": 12})
    # When gathered and combined by the weighted mean
    out = _gather(storage, spec, base, tmp_path)
    average = combine([p for _, p, _, _ in out.accepted], [w for *_, w, _ in out.accepted], shapes_of(base))
    # Then the weights are the scheduler's 4 and 12, and the mean is theirs
    assert [w for *_, w, _ in out.accepted] == [4, 12]
    for name in base:
        np.testing.assert_allclose(average[name], 0.25 * one[name] + 0.75 * two[name], rtol=1e-6)
    # And without weights from the scheduler every delta weighs 1, whatever it reports
    unweighted = _gather(storage, _spec(storage, reports), base, tmp_path)
    assert [w for *_, w, _ in unweighted.accepted] == [1, 1]


def test_of_two_deltas_one_above_ten_times_the_other_is_refused_by_the_median_bound(
        storage: SharedStorage, tmp_path: Path) -> None:
    # Given two deltas, one 100x the other (the base bound off: only the median bound can refuse it)
    base = _tensors(0)
    reports = [_plant(storage, tmp_path, "h", _tensors(1, 0.01)), _plant(storage, tmp_path, "x", _tensors(1, 1.0))]
    # When gathered
    out = _gather(storage, _spec(storage, reports, max_base_norm_ratio=None), base, tmp_path)
    # Then the large one is refused against the lower median, the smaller norm (the mean of two never triggers)
    assert [entry["ref"] for entry in out.refused] == [reports[1]["ref"]]
    assert "max_delta_norm_ratio" in out.refused[0]["reason"] and len(out.accepted) == 1


def test_a_delta_reported_twice_counts_once(storage: SharedStorage, tmp_path: Path) -> None:
    # Given one delta whose report appears twice in the outer step's deltas
    base = _tensors(0)
    report = _plant(storage, tmp_path, "t1", _tensors(1, 0.1))
    other = _plant(storage, tmp_path, "t2", _tensors(2, 0.1))
    # When gathered
    out = _gather(storage, _spec(storage, [report, dict(report), other]), base, tmp_path)
    # Then the second copy is refused, and each delta is accepted once
    assert sorted(r["ref"] for r, *_ in out.accepted) == [report["ref"], other["ref"]]
    assert [entry["ref"] for entry in out.refused] == [report["ref"]] and "again" in out.refused[0]["reason"]


def test_a_delta_key_without_the_safetensors_suffix_is_refused(storage: SharedStorage, tmp_path: Path) -> None:
    # Given a worker that stored its delta at the bare task id t1 (a key the inner task never writes)
    base = _tensors(0)
    path = tmp_path / "bare.safetensors"
    save_tensors(_tensors(1, 0.1), path, META)
    ref = f"jobs/{JOB}/round-1/t1"
    report = {"job": JOB, "round": 1, "ref": ref, "sha256": storage.put_file(ref, path).sha256, "samples": 4}
    # When gathered with t1 weighed by the scheduler
    out = _gather(storage, _spec(storage, [report], weights={"t1": 4}), base, tmp_path)
    # Then it is refused for its key
    assert out.accepted == [] and ".safetensors" in out.refused[0]["reason"]


def test_a_delta_from_a_task_the_scheduler_did_not_weigh_is_refused(storage: SharedStorage, tmp_path: Path) -> None:
    base = _tensors(0)
    reports = [_plant(storage, tmp_path, "t1", _tensors(1, 0.1)), _plant(storage, tmp_path, "extra", _tensors(2, 0.1))]
    out = _gather(storage, _spec(storage, reports, weights={"t1": 4}), base, tmp_path)
    assert len(out.accepted) == 1 and "not an inner task the scheduler weighed" in out.refused[0]["reason"]


def test_the_median_keeps_a_poisoned_minority_within_the_bounds_from_moving_the_model(
        storage: SharedStorage, tmp_path: Path) -> None:
    # Given three honest deltas and two that point the other way at 5x their size: inside both norm bounds
    base = _tensors(0)
    honest = [_tensors(seed, 0.01) for seed in (1, 2, 3)]
    evil = [{name: -5 * t for name, t in _tensors(seed, 0.01).items()} for seed in (4, 5)]
    reports = [_plant(storage, tmp_path, f"t{i}", d) for i, d in enumerate(honest + evil)]
    for aggregator in ("median", "trimmed_mean", "mean"):
        # When they pass the checks and are combined
        out = _gather(storage, _spec(storage, reports, aggregator=aggregator, trim=0.4), base, tmp_path)
        assert out.refused == []
        average = combine([p for _, p, _, _ in out.accepted], [1] * 5, shapes_of(base), aggregator=aggregator, trim=0.4)
        # Then the robust aggregators stay within the honest deltas' range at every coordinate; the mean does not
        inside = all(np.all((average[name] >= np.min([h[name] for h in honest], axis=0) - 1e-9)
                            & (average[name] <= np.max([h[name] for h in honest], axis=0) + 1e-9)) for name in base)
        assert inside is (aggregator != "mean"), aggregator


HOSTILE_FIGURES = [10**400, -(2**53), "x", True, None, float("nan"), float("inf"), [1], {"a": 1}]


@pytest.mark.parametrize("hostile", HOSTILE_FIGURES, ids=repr)
def test_a_hostile_reported_loss_is_skipped_never_raised(hostile: Any) -> None:
    # Given two accepted reports, one whose worker wrote a loss that is no usable number
    reports = [({"loss": 2.0}, 4), ({"loss": hostile}, 12)]
    # When the round's loss is averaged, Then only the honest figure counts
    assert _weighted(reports, "loss") == 2.0


@pytest.mark.parametrize("hostile", HOSTILE_FIGURES, ids=repr)
def test_hostile_reported_bytes_count_zero_never_raise(hostile: Any) -> None:
    # Given two accepted reports, one whose worker wrote bytes that are no usable number
    reports = [({"bytes": 100, "base_bytes": 50}, 1), ({"bytes": hostile, "base_bytes": hostile}, 1)]
    # When the bytes moved are summed, Then only the honest figures count
    assert _bytes_moved(reports) == 150


@pytest.mark.parametrize("hostile", [*HOSTILE_FIGURES, -5], ids=repr)
def test_hostile_reported_parameters_steps_and_seconds_count_zero_or_unknown(hostile: Any) -> None:
    # Given two reports, one whose worker wrote figures that are no usable count
    reports = [({"parameters": 10, "bytes": 40, "seconds": 2.0}, 1),
               ({"parameters": hostile, "bytes": hostile, "seconds": hostile, "steps": hostile}, 1)]
    # When the outer step sums the compression's figures, Then only the honest ones count
    assert _summed(reports, "parameters") == 10 and _summed(reports, "bytes") == 40
    # And the scheduler's round entry shows the hostile row's figures as unknown, never raising
    rows = inner_rows([{**report, "ref": f"jobs/j/round-1/t{i}.safetensors"} for i, (report, _) in enumerate(reports)],
                      {"t0": 0, "t1": 1})
    entry = round_entry(1, {}, rows, assigned=2, failed={}, duration_s=1.0)
    assert entry["compression"] is not None and describe_round(entry)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"aggregator": "mode"}, "aggregator must be one of mean, trimmed_mean, median"),
    ({"trim": 0.5}, "trim"),
    ({"max_delta_norm_ratio": 0.5}, "max_delta_norm_ratio"),
    ({"max_base_norm_ratio": "big"}, "max_base_norm_ratio"),
    ({"weights": {"t1": 0}}, r"weights\['t1'\]"),
    ({"weights": {"t1": True}}, r"weights\['t1'\]"),
    ({"weights": ["t1"]}, "weights must be an object"),
    ({"weights": {"a/b": 1}}, "not an inner task id"),
])
def test_bad_outer_step_arguments_are_refused_by_name(storage: SharedStorage, kwargs: dict[str, Any],
                                                      words: str) -> None:
    report = {"job": JOB, "round": 1, "ref": f"jobs/{JOB}/round-1/t1.safetensors", "sha256": "a" * 64, "samples": 1}
    with pytest.raises(InvalidTask, match=words):
        _spec(storage, [report], **kwargs)


def test_a_copy_of_an_inner_task_keeps_the_delta_its_first_run_wrote(storage: SharedStorage, tmp_path: Path) -> None:
    # Given the delta a first run of task t1 wrote and reported
    first = tmp_path / "first.safetensors"
    save_tensors(_tensors(1, 0.1), first, META)
    key = f"jobs/{JOB}/round-1/t1.safetensors"
    reported = publish_delta(storage, key, first)
    # When a copy of the task (redelivered while the first finished) publishes other bytes under the same key
    copy = tmp_path / "copy.safetensors"
    save_tensors(_tensors(2, 0.1), copy, META)
    again = publish_delta(storage, key, copy)
    # Then the stored delta is still the first run's, and the copy reports its sha256 and size
    assert again == reported
    assert storage.get_file(key, tmp_path / "check.safetensors", sha256=reported.sha256).sha256 == reported.sha256

"""Compressed pseudo-gradients: bytes, what decodes back, error feedback, and hostile files refused before use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from hypha_celery.errors import DeltaRejected, InvalidTask
from hypha_celery.training.distributed.compression import (
    INT8_BLOCK,
    Residuals,
    decoded,
    encode,
    quantize_int8,
    write_delta,
)
from hypha_celery.training.distributed.deltas import combine, save_tensors, scan_delta, shapes_of
from hypha_celery.training.distributed.inner import parse_block
from hypha_celery.training.distributed.scheduler import _Settings
from hypha_celery.training.distributed.timebox import work_weights
from hypha_celery.training.finetune.loop import _out_of_time

META = {"job": "j", "round": "1", "base_sha256": "a" * 64}


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"embed": (1e-3 * rng.standard_normal((64, 48))).astype(np.float32),
            "norm": (1e-3 * rng.standard_normal(48)).astype(np.float32),
            "odd": (1e-3 * rng.standard_normal((5, 7))).astype(np.float32)}  # not a whole block


def _read(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    with decoded(path, shapes, "d") as tensors:
        return {name: np.array(tensor, dtype=np.float32) for name, tensor in tensors}


@pytest.mark.parametrize(("compression", "ratio", "error"), [("none", 1.0, 0.0), ("bf16", 0.51, 4e-3),
                                                             ("int8", 0.27, 5e-3)])
def test_each_encoding_decodes_close_to_the_delta_in_fewer_bytes(tmp_path: Path, compression: str, ratio: float,
                                                                 error: float) -> None:
    # Given a float32 delta, written plain and under the encoding
    delta = _delta()
    save_tensors(delta, tmp_path / "plain.safetensors", META)
    write_delta(delta, tmp_path / "d.safetensors", META, compression)
    # Then the file is at most the stated fraction of float32's bytes (a few header bytes aside)
    plain, packed = (tmp_path / "plain.safetensors").stat().st_size, (tmp_path / "d.safetensors").stat().st_size
    values = sum(t.size for t in delta.values())
    assert packed - 1024 <= ratio * 4 * values, (packed, plain)
    # And it passes the outer step's checks, decoding within the stated relative error of each value's block
    scan_delta(tmp_path / "d.safetensors", shapes_of(delta), META, "d")
    back = _read(tmp_path / "d.safetensors", shapes_of(delta))
    for name, tensor in delta.items():
        assert back[name].dtype == np.float32
        assert np.abs(back[name] - tensor).max() <= error * np.abs(tensor).max() + 1e-12, name


def test_int8_scales_are_per_block_so_an_outlier_coarsens_its_block_only() -> None:
    # Given a tensor of small values with one outlier in its first block
    tensor = np.full(4 * INT8_BLOCK, 1e-3, np.float32)
    tensor[0] = 10.0
    values, scales = quantize_int8(tensor)
    # Then one scale per block; the outlier's block loses the small values, the other blocks keep them
    assert scales.shape == (4,) and values.dtype == np.int8
    back = (values.astype(np.float32).reshape(4, -1) * scales[:, None]).ravel()
    assert back[1] == 0.0 and np.allclose(back[INT8_BLOCK:], 1e-3, rtol=1e-2)


def test_error_feedback_sends_what_quantization_dropped_in_later_rounds(tmp_path: Path) -> None:
    # Given the same delta every round, whose small coordinates int8 rounds to zero next to an outlier
    delta = {"w": np.full(INT8_BLOCK, 1e-3, np.float32)}
    delta["w"][0] = 1.0
    sent: dict[bool, np.ndarray] = {}
    for feedback in (True, False):
        residuals = Residuals(tmp_path / f"r-{feedback}") if feedback else None
        total = np.zeros(INT8_BLOCK, np.float64)
        for round_ in range(1, 11):
            path = tmp_path / f"{feedback}-{round_}.safetensors"
            write_delta(delta, path, META, "int8", residuals=residuals, job="j")
            total += _read(path, {"w": (INT8_BLOCK,)})["w"]
        sent[feedback] = total
    truth = 10 * delta["w"].astype(np.float64)
    # Then without feedback the small coordinates never get through (the error grows with the rounds); with it,
    # what was sent over ten rounds is the true sum within one quantization step
    assert np.abs(sent[False] - truth)[1:].min() == pytest.approx(10e-3, rel=1e-3)
    assert np.abs(sent[True] - truth).max() <= 1.0 / 127 / 2 + 1e-6


def test_residuals_are_per_job_bounded_expire_and_go_with_the_final_round(tmp_path: Path) -> None:
    residuals = Residuals(tmp_path / "res", max_jobs=2, ttl_s=1e12)
    shapes = {"w": (3,)}
    # Given residuals of three jobs written one after another
    for index, job in enumerate(("a", "b", "c")):
        residuals.put(job, {"w": np.full(3, float(index + 1), np.float32)})
        os.utime(residuals.path(job), (1000.0 + index, 1000.0 + index))
    residuals.sweep(now=1050.0)
    # Then only the two most recent are kept, and taking one removes it
    assert sorted(p.name for p in (tmp_path / "res").glob("*.safetensors")) == ["b.safetensors", "c.safetensors"]
    taken = residuals.take("c", shapes)
    assert taken is not None and taken["w"].tolist() == [3.0] * 3 and residuals.take("c", shapes) is None
    # And one of other shapes is not used; one untouched past its time-to-live is dropped
    assert residuals.take("b", {"w": (4,)}) is None
    residuals.put("d", {"w": np.ones(3, np.float32)})
    residuals.ttl_s = 100.0
    residuals.sweep(now=os.path.getmtime(residuals.path("d")) + 101)
    assert residuals.take("d", shapes) is None
    # And the job's final round keeps none
    write_delta({"w": np.ones(3, np.float32)}, tmp_path / "x.safetensors", META, "int8", residuals=residuals, job="e")
    assert residuals.path("e").is_file()
    write_delta({"w": np.ones(3, np.float32)}, tmp_path / "y.safetensors", META, "int8", residuals=residuals, job="e",
                final=True)
    assert not residuals.path("e").exists()


def _hostile(delta: dict[str, np.ndarray]) -> dict[str, tuple[dict[str, np.ndarray], str, str]]:
    stored, _ = encode(delta, "int8")
    name = "embed"
    nan_scale = {**stored, f"{name}::scale": np.full_like(stored[f"{name}::scale"], np.nan)}
    return {
        "zero scale": ({**stored, f"{name}::scale": np.zeros_like(stored[f"{name}::scale"])}, "int8-block256",
                       "not finite and above 0"),
        "nan scale": (nan_scale, "int8-block256", "not finite and above 0"),
        "negative scale": ({**stored, f"{name}::scale": -stored[f"{name}::scale"]}, "int8-block256", "above 0"),
        "scales too few": ({**stored, f"{name}::scale": stored[f"{name}::scale"][:-1]}, "int8-block256", "scales"),
        "scales float64": ({**stored, f"{name}::scale": stored[f"{name}::scale"].astype(np.float64)},
                           "int8-block256", "scales"),
        "scale missing": ({k: v for k, v in stored.items() if k != f"{name}::scale"}, "int8-block256",
                          "not the base's"),
        "values float32 under int8": ({**stored, name: delta[name]}, "int8-block256", "stores int8"),
        "values reshaped": ({**stored, name: stored[name].reshape(48, 64)}, "int8-block256", "shape"),
        "other block size": (stored, "int8-block64", "scales"),
        "unknown encoding": (stored, "int4", "unknown encoding"),
        "int8 values under none": (stored, "none", "not the base's"),
        "float32 under bf16": (delta, "bf16", "stores bfloat16"),
        "int8 named as none": ({n: np.zeros(t.shape, np.int8) for n, t in delta.items()}, "none", "float"),
    }


@pytest.mark.parametrize("case", sorted(_hostile(_delta())))
def test_a_hostile_workers_encoded_file_is_refused_before_use(tmp_path: Path, case: str) -> None:
    # Given a delta file that lies about or breaks its encoding
    delta = _delta()
    tensors, encoding, reason = _hostile(delta)[case]
    save_tensors(tensors, tmp_path / "d.safetensors", {**META, "encoding": encoding})
    # When the outer step checks it, or combines it, Then it is refused naming the fault
    with pytest.raises(DeltaRejected, match=reason):
        scan_delta(tmp_path / "d.safetensors", shapes_of(delta), META, "d")
    with pytest.raises(DeltaRejected, match=reason):
        combine([tmp_path / "d.safetensors"], [1], shapes_of(delta))


def test_a_decoded_delta_with_inf_is_refused_by_the_value_checks(tmp_path: Path) -> None:
    # Given a bf16 delta holding an infinity (a valid encoding, a poisoned value)
    delta = _delta()
    delta["norm"][3] = np.inf
    save_tensors({n: t.astype(ml_dtypes.bfloat16) for n, t in delta.items()}, tmp_path / "d.safetensors",
                 {**META, "encoding": "bf16"})
    with pytest.raises(DeltaRejected, match="NaN or infinite"):
        scan_delta(tmp_path / "d.safetensors", shapes_of(delta), META, "d")


def test_the_outer_mean_of_int8_deltas_is_the_mean_of_what_was_sent(tmp_path: Path) -> None:
    deltas = [_delta(1), _delta(2)]
    for index, delta in enumerate(deltas):
        write_delta(delta, tmp_path / f"{index}.safetensors", META, "int8")
    paths = [tmp_path / "0.safetensors", tmp_path / "1.safetensors"]
    average = combine(paths, [3, 1], shapes_of(deltas[0]))
    sent = [_read(path, shapes_of(deltas[0])) for path in paths]
    for name in deltas[0]:
        np.testing.assert_allclose(average[name], (3 * sent[0][name].astype(np.float64) + sent[1][name]) / 4)


@pytest.mark.parametrize(("block", "message"), [
    ({"job": "j", "round": 1, "inner_steps": 5, "compression": "int4"}, "diloco.compression"),
    ({"job": "j", "round": 1, "inner_steps": 5, "error_feedback": "yes"}, "diloco.error_feedback"),
    ({"job": "j", "round": 1, "inner_seconds": 0}, "diloco.inner_seconds"),
    ({"job": "j", "round": 1, "inner_seconds": True}, "diloco.inner_seconds"),
    ({"job": "j", "round": 1}, "diloco.inner_steps"),
])
def test_the_blocks_new_fields_are_checked_by_name(block: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidTask, match=message):
        parse_block(block)


def test_a_time_boxed_block_needs_no_inner_steps_and_the_scheduler_marks_the_final_round() -> None:
    block = parse_block({"job": "j", "round": 2, "inner_seconds": 1.5, "compression": "int8", "final": True})
    assert block.inner_steps is None and block.max_steps >= 1_000_000 and block.inner_seconds == 1.5
    assert block.compression == "int8" and block.error_feedback and block.final
    settings = _Settings(model="m", shards=[], rounds=3, inner_steps=None, outer_lr=1, outer_momentum=0,
                         min_workers=1, requirements=None, aggregate_requirements={}, signing_key=None,
                         round_timeout=5, straggler_s=5, queue=None, inner_seconds=2.0, compression="int8")
    assert [settings.block("j", r).get("final") for r in (1, 2, 3)] == [False, False, True]
    assert parse_block(settings.block("j", 3)).inner_seconds == 2.0


def test_a_time_box_stops_before_a_step_that_would_end_past_it() -> None:
    assert not _out_of_time(None, 100.0, 10)
    assert not _out_of_time(10.0, 0.0, 0)  # one step always runs
    assert not _out_of_time(10.0, 8.0, 8)  # 8 s for 8 steps: the ninth ends at 9 s
    assert _out_of_time(10.0, 9.5, 8)  # the ninth would end at ~10.7 s


def test_time_boxed_weights_are_shard_size_times_steps_capped_at_four_medians() -> None:
    sizes = {"fast": 10, "slow": 10, "liar": 10}
    reports = {"fast": {"steps": 30}, "slow": {"steps": 10}, "liar": {"steps": 10**6}}
    # The lower median of (10, 30, 10**6) is 30: the liar's steps count as 4 x 30
    assert work_weights(sizes, reports) == {"fast": 300, "slow": 100, "liar": 1200}
    assert work_weights({"a": 2}, {"a": {"steps": True}}) == {"a": 2}

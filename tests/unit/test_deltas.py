"""DiLoCo's arithmetic: pseudo-gradients, the checks on a delta, and the outer step against torch's Nesterov SGD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hypha_celery.errors import DeltaRejected, InvalidTask, UnsupportedModel
from hypha_celery.training.distributed.deltas import (
    combine,
    combine_stack,
    l2_norm,
    load_weights,
    nesterov,
    outer_step,
    pseudo_gradient,
    save_tensors,
    scan_delta,
    shapes_of,
)
from hypha_celery.training.distributed.inner import parse_block

META = {"job": "j", "round": "1", "base_sha256": "a" * 64}


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}


def _shapes(tensors: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def test_a_pseudo_gradient_is_base_minus_trained(tmp_path: Path) -> None:
    # Given a base and a trained checkpoint
    base, trained = _weights(0), _weights(1)
    save_tensors(base, tmp_path / "base.safetensors", {})
    save_tensors(trained, tmp_path / "trained.safetensors", {})
    # When the pseudo-gradient is written
    pseudo_gradient(tmp_path / "base.safetensors", tmp_path / "trained.safetensors", tmp_path / "d.safetensors", META)
    # Then it is base - trained, and it passes the checks for its own job, round and base
    scan_delta(tmp_path / "d.safetensors", _shapes(base), META, "d")
    delta = load_weights(tmp_path / "d.safetensors", "d")
    for name in base:
        np.testing.assert_allclose(delta[name], base[name] - trained[name])


def test_a_delta_for_another_round_or_of_other_shapes_is_refused(tmp_path: Path) -> None:
    base = _weights(0)
    save_tensors(base, tmp_path / "d.safetensors", META)
    # When it is offered to round 2, Then it is refused, naming the round
    with pytest.raises(DeltaRejected, match="round '1', not '2'"):
        scan_delta(tmp_path / "d.safetensors", _shapes(base), {**META, "round": "2"}, "d")
    # And a delta whose tensor shapes differ from the base's is refused
    save_tensors({"w": np.zeros((4, 3), np.float32), "b": base["b"]}, tmp_path / "bad.safetensors", META)
    with pytest.raises(DeltaRejected, match="shape"):
        scan_delta(tmp_path / "bad.safetensors", _shapes(base), META, "bad")
    # And a file that is no safetensors at all
    (tmp_path / "junk.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"not json")
    with pytest.raises(DeltaRejected, match="not a safetensors file"):
        scan_delta(tmp_path / "junk.safetensors", _shapes(base), META, "junk")


def test_a_bfloat16_base_gives_a_float32_delta_and_a_bfloat16_next_version(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    # Given a bfloat16 base (as published checkpoints are) and its float32 fine-tune (the trainer works in float32)
    base = {k: torch.tensor(v).to(torch.bfloat16) for k, v in _weights(0).items()}
    trained = {k: v.float() - 0.25 for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(trained, str(tmp_path / "trained.safetensors"))
    # When the pseudo-gradient is written and one outer step applied
    pseudo_gradient(tmp_path / "base.safetensors", tmp_path / "trained.safetensors", tmp_path / "d.safetensors", META)
    start = load_weights(tmp_path / "base.safetensors", "base")
    scan_delta(tmp_path / "d.safetensors", _shapes(start), META, "d")
    delta = load_weights(tmp_path / "d.safetensors", "d")
    weights, _ = outer_step(start, [(delta, 1)], None, lr=1.0, momentum=0.0)
    save_tensors(weights, tmp_path / "next.safetensors", {})
    # Then the delta is float32 base - trained, and the next version is bfloat16 equal to the trained weights
    for name in base:
        assert str(delta[name].dtype) == "float32"
        np.testing.assert_allclose(delta[name], np.full(base[name].shape, 0.25, np.float32))
    nxt = load_file(str(tmp_path / "next.safetensors"))
    for name in base:
        assert nxt[name].dtype == torch.bfloat16
        assert torch.equal(nxt[name], trained[name].to(torch.bfloat16))


def test_a_checkpoint_of_integers_is_refused_with_the_reason(tmp_path: Path) -> None:
    save_tensors({"w": np.zeros(2, np.int64)}, tmp_path / "ints.safetensors", {})
    with pytest.raises(UnsupportedModel, match="float16/bfloat16/32/64"):
        load_weights(tmp_path / "ints.safetensors", "ints")


def test_with_lr_one_and_no_momentum_the_step_is_the_sample_weighted_average() -> None:
    # Given a base and two workers' trained weights, one with three times the samples
    base, one, two = _weights(0), _weights(1), _weights(2)
    deltas = [({k: base[k] - one[k] for k in base}, 3), ({k: base[k] - two[k] for k in base}, 1)]
    # When the outer step is plain averaging (FedAvg)
    weights, _ = outer_step(base, deltas, None, lr=1.0, momentum=0.0)
    # Then the next weights are the weighted average of the trained ones
    for name in base:
        np.testing.assert_allclose(weights[name], 0.75 * one[name] + 0.25 * two[name], rtol=1e-5, atol=1e-6)


def test_the_outer_step_matches_torch_sgd_with_nesterov_momentum_over_rounds() -> None:
    # Given torch's SGD(nesterov=True) on the same parameters, fed the averaged pseudo-gradient as its gradient
    base = _weights(0)
    params = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in base.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=True)
    current, momentum = base, None
    for round_ in range(3):
        deltas = [({k: _weights(10 + round_)[k] * 0.1 for k in base}, 2), ({k: _weights(20 + round_)[k] * 0.1
                                                                           for k in base}, 5)]
        average = {k: (2 * deltas[0][0][k] + 5 * deltas[1][0][k]) / 7 for k in base}
        # When both take one outer step per round
        current, momentum = outer_step(current, deltas, momentum, lr=0.7, momentum=0.9)
        optimizer.zero_grad()
        for name, parameter in params.items():
            parameter.grad = torch.tensor(average[name])
        optimizer.step()
        # Then the weights agree round after round (the momentum carried between rounds)
        for name, parameter in params.items():
            np.testing.assert_allclose(current[name], parameter.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dtype", "step", "what"), [
    ("float16", 1e5, "weights"),  # finite in float64, beyond float16's 65504
    ("float64", 1e39, "momentum"),  # finite weights in float64, a momentum beyond float32
])
def test_an_outer_step_that_would_publish_non_finite_values_is_refused_naming_the_tensor(
        dtype: str, step: float, what: str) -> None:
    # Given a base and an averaged pseudo-gradient, each finite, whose step overflows the stored dtype
    base = {"a": np.ones(3, dtype=dtype), "b": np.ones(2, dtype=dtype)}
    average = {"a": np.zeros(3), "b": np.full(2, step)}
    # When the outer step is taken
    # Then it is refused, naming the tensor, before anything could be published
    with pytest.raises(DeltaRejected, match=f"non-finite weights: tensor b's {what}"):
        nesterov(base, average, None, lr=0.7, momentum=0.9)


def test_the_trimmed_mean_and_the_median_are_taken_coordinate_by_coordinate() -> None:
    # Given five deltas of one tensor, one of them far off at every coordinate
    stack = np.array([[1.0, -2.0], [2.0, 0.0], [3.0, 1.0], [4.0, 5.0], [1e6, -1e6]])
    # When they are combined by each aggregator
    trimmed = combine_stack(stack, [1] * 5, "trimmed_mean", 0.2)
    median = combine_stack(stack, [1] * 5, "median", 0.0)
    mean = combine_stack(stack, [1, 1, 1, 1, 6], "mean", 0.0)
    # Then the trimmed mean drops the lowest and highest value of each column (ceil(0.2 x 5) = 1 each end) and
    # averages the three left; the median is the middle value; the mean is weighted
    np.testing.assert_allclose(trimmed, [(2 + 3 + 4) / 3, (-2 + 0 + 1) / 3])
    np.testing.assert_allclose(median, [3.0, 0.0])
    np.testing.assert_allclose(mean, (stack[:4].sum(axis=0) + 6 * stack[4]) / 10)


def test_a_trimmed_mean_of_two_or_three_keeps_at_least_one_value() -> None:
    # Given three deltas, and a trim that asks to drop one at each end
    stack = np.array([[0.0], [1.0], [100.0]])
    # Then three keep the middle one; two keep both (nothing can be dropped from each end of two)
    np.testing.assert_allclose(combine_stack(stack, [1] * 3, "trimmed_mean", 0.1), [1.0])
    np.testing.assert_allclose(combine_stack(stack[:2], [1] * 2, "trimmed_mean", 0.4), [0.5])


def test_combining_files_tensor_by_tensor_is_the_weighted_mean_of_their_tensors(tmp_path: Path) -> None:
    # Given two deltas on disk
    one, two = _weights(1), _weights(2)
    save_tensors(one, tmp_path / "1.safetensors", META)
    save_tensors(two, tmp_path / "2.safetensors", META)
    # When they are combined with the weights 3 and 1
    out = combine([tmp_path / "1.safetensors", tmp_path / "2.safetensors"], [3, 1], shapes_of(one))
    # Then each tensor is their weighted mean
    for name in one:
        np.testing.assert_allclose(out[name], 0.75 * one[name] + 0.25 * two[name], rtol=1e-6)


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_a_delta_holding_nan_or_inf_is_refused_naming_the_tensor(tmp_path: Path, poison: float) -> None:
    # Given a delta with the right metadata and shapes, and one value NaN or infinite
    delta = _weights(1)
    delta["b"][2] = poison
    save_tensors(delta, tmp_path / "d.safetensors", META)
    shapes = {name: tensor.shape for name, tensor in delta.items()}
    # When it is scanned, Then it is refused, naming the tensor
    with pytest.raises(DeltaRejected, match="tensor b holds NaN or infinite values"):
        scan_delta(tmp_path / "d.safetensors", shapes, META, "d")


def test_scanning_a_delta_gives_its_l2_norm_and_checks_its_shapes(tmp_path: Path) -> None:
    delta = _weights(1)
    save_tensors(delta, tmp_path / "d.safetensors", META)
    shapes = {name: tensor.shape for name, tensor in delta.items()}
    # Then its norm is the L2 norm of all its values together
    expected = float(np.sqrt(sum((t.astype(np.float64) ** 2).sum() for t in delta.values())))
    assert scan_delta(tmp_path / "d.safetensors", shapes, META, "d") == pytest.approx(expected)
    assert l2_norm(delta) == pytest.approx(expected)
    # And a delta of other shapes or other tensors is refused
    with pytest.raises(DeltaRejected, match="shape"):
        scan_delta(tmp_path / "d.safetensors", {**shapes, "w": (4, 3)}, META, "d")
    with pytest.raises(DeltaRejected, match="not the base's"):
        scan_delta(tmp_path / "d.safetensors", {**shapes, "extra": (1,)}, META, "d")


@pytest.mark.parametrize(("block", "words"), [
    ({"job": "j", "round": 0, "inner_steps": 5}, "diloco.round"),
    ({"job": "../x", "round": 1, "inner_steps": 5}, "diloco.job"),
    ({"job": "j", "round": 1, "inner_steps": True}, "diloco.inner_steps"),
    ({"job": "j", "round": 1, "inner_steps": 5, "lr": 1}, "unknown key 'lr'"),
    ("j", "must be an object"),
])
def test_a_bad_diloco_block_is_refused_by_name(block: object, words: str) -> None:
    with pytest.raises(InvalidTask, match=words):
        parse_block(block)

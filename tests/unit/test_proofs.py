"""Checkable generations without processes: the commitment math, and a corpus on the tiny Llama.

The corpus is what calibrates :data:`hypha_celery.runtimes.proofs.THRESHOLDS`: the same model with
other batch sizes (and a bf16 prover) is accepted every time; a swapped model, float8-rounded
weights, an altered prompt, an altered token or altered commitment bytes are rejected every time.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import InvalidInput, InvalidTask
from hypha_celery.models.examples import TINY_LLAMA, write_tiny_llama
from hypha_celery.models.store import ModelStore
from hypha_celery.runtimes import proofs, transformers_generation, transformers_loading, transformers_proofs
from hypha_celery.stages.validation import GenerateParams, validate_generate, validate_verify
from hypha_celery.work import Generate, Generated, Prompt

torch = pytest.importorskip("torch", reason="the proofs' tests run the tiny Llama with torch")
np = pytest.importorskip("numpy", reason="the commitment math is numpy")

OTHER = "tiny-llama-other-init"
NEW_TOKENS = 64
CORPUS = [f"{opening} the {animal} {verb} on the"
          for opening in ("Once upon a time", "In the morning", "Yesterday")
          for animal, verb in (("cat", "sat"), ("dog", "slept"), ("bird", "stood"), ("fox", "lay"))]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("proof-store")
    store = ModelStore(root / "store")
    for name, seed in ((TINY_LLAMA, 0), (OTHER, 1)):
        folder = root / name
        folder.mkdir()
        write_tiny_llama(folder, seed=seed)
        store.add("transformers", folder, name)
    return store


@pytest.fixture(scope="module")
def llama(store: ModelStore) -> transformers_loading.TransformerModel:
    torch.set_num_threads(1)
    return transformers_loading.load(store.open(TINY_LLAMA), "cpu")[0]


def _generate(model: transformers_loading.TransformerModel, prompts: list[str], **params: Any) -> list[Generated]:
    request = Generate(model=TINY_LLAMA, prompts=[Prompt(prompt=p) for p in prompts], progress_interval=60.0,
                       params=GenerateParams(max_new_tokens=NEW_TOKENS, proof=True, **params).to_json())
    outputs = transformers_generation.generate(model, request, lambda _update: None).outputs
    assert all(isinstance(o, Generated) and o.proof is not None for o in outputs)
    return outputs  # type: ignore[return-value]


def _in_batches(model: transformers_loading.TransformerModel, size: int) -> list[Generated]:
    return [out for start in range(0, len(CORPUS), size) for out in _generate(model, CORPUS[start:start + size])]


def _verify(model: transformers_loading.TransformerModel, prompt: str, proof: dict[str, Any]) -> dict[str, Any]:
    return transformers_proofs.verify(model, {"prompt": prompt, "proof": proof})


@pytest.fixture(scope="module")
def alone(llama: transformers_loading.TransformerModel) -> list[Generated]:
    return _in_batches(llama, 1)


# --- the math --------------------------------------------------------------------------------------


def test_the_polynomial_passes_through_every_committed_point() -> None:
    # Given 128 distinct points with 16-bit values
    rng = np.random.default_rng(0)
    xs = rng.choice(proofs.PRIME - 1, size=128, replace=False)
    ys = rng.integers(0, 1 << 16, size=128) % proofs.PRIME
    # When the polynomial through them is evaluated at them
    # Then it gives their values back
    assert (proofs.evaluate(proofs.interpolate(xs, ys), xs) == ys).all()


def test_a_commitment_is_258_bytes_per_32_tokens_whatever_the_hidden_size() -> None:
    # Given the hidden states of 64 tokens, at two hidden sizes
    for hidden in (64, 4096):
        states = torch.randn(64, hidden, generator=torch.Generator().manual_seed(hidden))
        # When they are committed to, Then each chunk of 32 tokens costs 2 + 2 * 128 bytes
        assert len(proofs.commit(states)) == 2 * 258


def test_the_same_states_check_and_other_states_do_not() -> None:
    # Given a commitment to some hidden states
    states = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    commitments = proofs.commit(states)
    # When the same states, then unrelated ones, are checked against it
    # Then the first are accepted and the second rejected
    assert proofs.check(states, commitments).accepted
    assert not proofs.check(torch.randn(40, 64), commitments).accepted


@pytest.mark.parametrize(("change", "named"), [
    ({"version": 2}, "version"),
    ({"tokens": []}, "tokens"),
    ({"tokens": [1, -2]}, "tokens"),
    ({"tokens": [1, True]}, "tokens"),
    ({"k": 0}, "k"),
    ({"chunk": "32"}, "chunk"),
    ({"k": 16}, "chunk"),
    ({"commitments": "not base64!"}, "base64"),
    ({"commitments": base64.b64encode(b"\0" * 3).decode()}, "commitments"),
    ({"commitments": base64.b64encode(b"\0" * 10_000).decode()}, "commitments"),
    ({"model": 3}, "model"),
])
def test_a_malformed_proof_is_refused_by_name(change: dict[str, Any], named: str) -> None:
    # Given a well-formed proof with one field planted wrong
    good = proofs.Proof(tokens=[5] * 40, commitments=proofs.commit(torch.randn(40, 64))).to_json()
    # When it is parsed, Then a ProofFormatError names the field
    with pytest.raises(proofs.ProofFormatError, match=named):
        proofs.Proof.from_json({**good, **change})


# --- the corpus on the tiny Llama ---------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_the_same_model_at_any_batch_size_is_accepted_every_time(
        llama: transformers_loading.TransformerModel, batch_size: int) -> None:
    # Given the corpus generated with proofs in batches of this size
    outputs = _in_batches(llama, batch_size)
    # When each is replayed alone by a verifier with the same model
    checks = [_verify(llama, prompt, out.proof) for prompt, out in zip(CORPUS, outputs, strict=True)]
    # Then every one is accepted: no false rejection
    assert [c["accepted"] for c in checks] == [True] * len(CORPUS), [c["reason"] for c in checks]


def test_a_bf16_prover_is_accepted_by_a_float32_verifier(store: ModelStore,
                                                         llama: transformers_loading.TransformerModel) -> None:
    # Given the corpus generated by the model computing in bfloat16 (what a GPU worker runs)
    bf16 = transformers_loading.load(store.open(TINY_LLAMA), "cpu", dtype="bfloat16")[0]
    outputs = _in_batches(bf16, 4)
    assert outputs[0].proof is not None and outputs[0].proof["dtype"] == "bfloat16"
    # When a float32 verifier replays them, Then every one is accepted
    checks = [_verify(llama, prompt, out.proof) for prompt, out in zip(CORPUS, outputs, strict=True)]
    assert [c["accepted"] for c in checks] == [True] * len(CORPUS), [c["reason"] for c in checks]


def test_a_swapped_model_is_rejected_every_time(store: ModelStore, alone: list[Generated]) -> None:
    # Given the corpus's proofs, and a verifier holding another initialisation of the same architecture
    other = transformers_loading.load(store.open(OTHER), "cpu")[0]
    # When it replays them, Then every one is rejected
    assert not any(_verify(other, p, out.proof)["accepted"] for p, out in zip(CORPUS, alone, strict=True))


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_weights_rounded_through_float8_are_rejected_every_time(
        llama: transformers_loading.TransformerModel, alone: list[Generated], dtype: str) -> None:
    # Given the model's weights cast to a float8 dtype and back (a cheaper model served under the same name)
    rounded = copy.deepcopy(llama)
    with torch.no_grad():
        for parameter in rounded.module.parameters():
            parameter.copy_(parameter.to(getattr(torch, dtype)).to(parameter.dtype))
    # When it replays the true model's proofs, Then every one is rejected
    assert not any(_verify(rounded, p, out.proof)["accepted"] for p, out in zip(CORPUS, alone, strict=True))


@pytest.mark.parametrize(("old", "new"), [("the", "a"), ("on the", "by the"), ("time", "times")])
def test_an_altered_prompt_is_rejected_every_time(llama: transformers_loading.TransformerModel,
                                                  alone: list[Generated], old: str, new: str) -> None:
    # Given the corpus's proofs
    altered = [(prompt.replace(old, new, 1), out) for prompt, out in zip(CORPUS, alone, strict=True) if old in prompt]
    assert altered
    # When the verifier is told a prompt with one word changed, Then every proof is rejected
    assert not any(_verify(llama, prompt, out.proof)["accepted"] for prompt, out in altered)


@pytest.mark.parametrize("position", [0, 5, 40, NEW_TOKENS - 2])
def test_an_altered_generated_token_is_rejected_every_time(llama: transformers_loading.TransformerModel,
                                                           alone: list[Generated], position: int) -> None:
    # Given each proof with one generated token replaced by another
    for prompt, out in zip(CORPUS, alone, strict=True):
        assert out.proof is not None and len(out.proof["tokens"]) == NEW_TOKENS
        tokens = list(out.proof["tokens"])
        tokens[position] = (tokens[position] + 7) % 200
        # When it is replayed, Then it is rejected
        assert not _verify(llama, prompt, {**out.proof, "tokens": tokens})["accepted"], (prompt, position)


def test_altered_commitment_bytes_are_rejected(llama: transformers_loading.TransformerModel,
                                               alone: list[Generated]) -> None:
    # Given a proof with one coefficient of its second chunk changed
    proof = alone[0].proof
    assert proof is not None
    raw = bytearray(base64.b64decode(proof["commitments"]))
    raw[258 + 20] ^= 0x5A
    # When it is replayed, Then it is rejected and the reason names the second chunk
    check = _verify(llama, CORPUS[0], {**proof, "commitments": base64.b64encode(bytes(raw)).decode()})
    assert not check["accepted"] and check["stats"]["worst_chunk"] == 1, check


def test_a_proof_that_commits_less_than_the_verifier_checks_is_rejected(
        llama: transformers_loading.TransformerModel) -> None:
    # Given a generation's true hidden states, committed honestly but with one value per position
    # (a cheaper, weaker commitment than the verifier's four)
    with transformers_proofs.capture(llama) as states:
        out = _generate(llama, CORPUS[0])[0]
    assert out.proof is not None
    hidden = torch.cat([step[:, -1:, :] for step in states], dim=1)[0, :NEW_TOKENS]
    weak = {**out.proof, "k": 32, "chunk": 32, "commitments": base64.b64encode(
        proofs.commit(hidden, k=32, chunk=32)).decode()}
    # When it is replayed, Then it is rejected, naming what this verifier checks
    check = _verify(llama, CORPUS[0], weak)
    assert not check["accepted"] and "k=128" in check["reason"]


def test_a_token_outside_the_vocabulary_is_rejected_without_a_pass(llama: transformers_loading.TransformerModel,
                                                                   alone: list[Generated]) -> None:
    # Given a proof whose tokens name an id past the vocabulary
    proof = alone[0].proof
    assert proof is not None
    # When it is replayed, Then it is rejected, naming the vocabulary
    check = _verify(llama, CORPUS[0], {**proof, "tokens": [10**9] * len(proof["tokens"])})
    assert not check["accepted"] and "vocabulary" in check["reason"]


def test_a_generation_without_proof_carries_none(llama: transformers_loading.TransformerModel) -> None:
    # Given a generation that did not ask for a proof
    request = Generate(model=TINY_LLAMA, prompts=[Prompt(prompt=CORPUS[0])], progress_interval=60.0,
                       params=GenerateParams(max_new_tokens=4).to_json())
    [out] = transformers_generation.generate(llama, request, lambda _update: None).outputs
    # Then its output has no proof
    assert isinstance(out, Generated) and out.proof is None


# --- the tasks' arguments -----------------------------------------------------------------------------


def test_generate_takes_proof_as_a_boolean(store: ModelStore) -> None:
    cfg = parse_config({"worker": {}})
    # Given proof=True, Then it reaches the sampling settings
    assert validate_generate(cfg, store, (), {"model": TINY_LLAMA, "prompt": "hi", "proof": True}).params.proof
    # Given proof="yes", Then it is refused by name
    with pytest.raises(InvalidTask, match="proof"):
        validate_generate(cfg, store, (), {"model": TINY_LLAMA, "prompt": "hi", "proof": "yes"})


def test_verify_arguments_are_checked(store: ModelStore, alone: list[Generated]) -> None:
    cfg = parse_config({"worker": {}})
    proof = alone[0].proof
    # Given a valid request, Then it validates to its proof
    spec = validate_verify(cfg, store, (), {"model": TINY_LLAMA, "prompt": CORPUS[0], "proof": proof})
    assert spec.proof.tokens == proof["tokens"]  # type: ignore[index]
    # Given no prompt, a malformed proof, or more tokens than max_new_tokens, Then each is refused by name
    with pytest.raises(InvalidTask, match="prompt"):
        validate_verify(cfg, store, (), {"model": TINY_LLAMA, "proof": proof})
    with pytest.raises(InvalidInput, match=r"proof\.tokens"):
        validate_verify(cfg, store, (), {"model": TINY_LLAMA, "prompt": "hi", "proof": {**proof, "tokens": "x"}})
    small = parse_config({"worker": {"generation": {"max_new_tokens": 8}}})
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        validate_verify(small, store, (), {"model": TINY_LLAMA, "prompt": "hi", "proof": proof})


def test_the_proof_module_imports_nothing_of_the_worker() -> None:
    # Given the proof math's source, Then it names no executor, stage, task or worker module
    source = Path(proofs.__file__).read_text()
    assert not any(f"hypha_celery.{part}" in source for part in ("executor", "stages", "tasks", "worker"))

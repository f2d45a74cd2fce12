"""Sizing "auto" requirements from a manifest: weights, KV cache, CUDA context, margins; caps; defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha_celery.config import parse_config
from hypha_celery.errors import ExcessiveMemoryRequest, InvalidTask
from hypha_celery.manifest import Manifest
from hypha_celery.models.examples import TINY_CLASSIFIER, TINY_LLAMA, write_tiny_bert, write_tiny_llama
from hypha_celery.models.store import ModelStore
from hypha_celery.resources.gpu import CUDA_CONTEXT, CUDA_HOST_RUNTIME
from hypha_celery.resources.requirements import DEFAULT_MEMORY, Requirements
from hypha_celery.stages import sizing
from hypha_celery.stages.sizing import DEVICE_FLOOR, HOST_FLOOR, estimate, prompt_token_bound, requirements_for_model

CFG = parse_config({"worker": {}})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("sizing")
    store = ModelStore(root / "store")
    for name, write in ((TINY_LLAMA, write_tiny_llama), (TINY_CLASSIFIER, lambda p: write_tiny_bert(p, classifier=True))):
        (root / name).mkdir()
        write(root / name)
        store.add("transformers", root / name, name)
    return store


@pytest.fixture(scope="module")
def llama(store: ModelStore) -> Manifest:
    return store.manifest(TINY_LLAMA)


def never(model: str, gpu: bool) -> bool:
    return False


def test_auto_is_parsed_with_placeholders_and_sized_later() -> None:
    req = Requirements.parse({"memory": "auto", "gpu_memory": "auto"})
    assert req.auto == {"memory", "gpu_memory"} and req.gpus == 1
    assert "auto memory" in req.describe() and "auto each" in req.describe()
    sized = req.sized(memory=10, gpu_memory=20)
    assert (sized.memory, sized.gpu_memory, sized.auto) == (10, 20, frozenset())


def test_auto_by_default_leaves_given_sizes_alone() -> None:
    req = Requirements.parse({"memory": "1GiB", "gpus": 1}, auto_by_default=True)
    assert req.auto == {"gpu_memory"} and req.memory == 2**30
    assert Requirements.parse(None, auto_by_default=True).auto == {"memory"}
    assert Requirements.parse(None).auto == frozenset() and Requirements.parse(None).memory == DEFAULT_MEMORY


def test_cpu_generation_reserves_fp32_weights_kv_cache_and_margin(llama: Manifest) -> None:
    weights = llama.weights_bytes_at("float32")
    kv = llama.kv_bytes_per_token_at("float32")
    assert kv
    got = estimate(llama, gpu=False, cached=False, tokens=100)
    assert got.host == weights + 100 * kv + weights // 10 + HOST_FLOOR and got.device == 0
    # A model the executor already holds costs only its KV cache and the floor: not the weights, nor a share of them
    assert estimate(llama, gpu=False, cached=True, tokens=100).host == 100 * kv + HOST_FLOOR


def test_gpu_generation_reserves_bf16_weights_and_the_cuda_context_on_first_load(llama: Manifest) -> None:
    weights = llama.weights_bytes_at("bfloat16")
    assert weights == llama.weights_bytes_at("float32") // 2
    kv = llama.kv_bytes_per_token_at("bfloat16") or 0
    first = estimate(llama, gpu=True, cached=False, tokens=50)
    assert first.device == weights + CUDA_CONTEXT + 50 * kv + weights // 10 + DEVICE_FLOOR
    largest = max(llama.files[name].size for name in llama.weights_files)
    assert first.host == HOST_FLOOR + largest + CUDA_HOST_RUNTIME
    warm = estimate(llama, gpu=True, cached=True, tokens=50)
    assert warm.device == 50 * kv + DEVICE_FLOOR and warm.host == HOST_FLOOR


def test_training_counts_weights_gradients_and_two_optimizer_moments(llama: Manifest) -> None:
    weights = llama.weights_bytes_at("float32")
    assert estimate(llama, gpu=False, cached=True, training=True).host == 4 * weights + weights // 10 + HOST_FLOOR


def test_the_kv_cache_grows_with_max_new_tokens(store: ModelStore, llama: Manifest) -> None:
    short = requirements_for_model(CFG, None, llama, holds=never, tokens=10)
    long = requirements_for_model(CFG, None, llama, holds=never, tokens=1010)
    assert long.memory - short.memory == 1000 * (llama.kv_bytes_per_token_at("float32") or 0)


def test_transformers_models_default_to_auto_and_given_sizes_win(llama: Manifest) -> None:
    auto = requirements_for_model(CFG, None, llama, holds=never, tokens=1)
    assert auto.memory == estimate(llama, gpu=False, cached=False, tokens=1).host
    given = requirements_for_model(CFG, {"memory": "1GiB"}, llama, holds=never, tokens=1)
    assert given.memory == 2**30


def test_a_held_model_is_not_reserved_twice(llama: Manifest) -> None:
    asked: list[tuple[str, bool]] = []

    def held(model: str, gpu: bool) -> bool:
        asked.append((model, gpu))
        return True

    req = requirements_for_model(CFG, {"gpus": 1}, llama, holds=held, tokens=1)
    assert asked == [(TINY_LLAMA, True)]
    assert req.gpu_memory == estimate(llama, gpu=True, cached=True, tokens=1).device


def test_built_in_models_keep_the_fixed_default(tmp_path: Path) -> None:
    from hypha_celery.formats.builtin import build, example_input_shape

    store = ModelStore(tmp_path)
    config = {"in_features": 4, "hidden": 16, "out_features": 3}
    store.add("builtin", build("mlp", config), "mlp", architecture="mlp", config=config,
               input_shape=example_input_shape("mlp", config))
    req = requirements_for_model(CFG, None, store.manifest("mlp"), holds=never)
    assert req.memory == DEFAULT_MEMORY and req.auto == frozenset()


def test_an_auto_size_over_the_per_task_cap_is_refused_naming_the_cap(llama: Manifest) -> None:
    cfg = parse_config({"worker": {"max_memory_per_task": "100MiB"}})
    with pytest.raises(ExcessiveMemoryRequest, match="max_memory_per_task"):
        requirements_for_model(cfg, None, llama, holds=never, tokens=1)


def test_prompt_tokens_are_bounded_by_bytes_and_the_models_length() -> None:
    assert prompt_token_bound("héllo", None, None) == len("héllo".encode()) + 8
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert prompt_token_bound(None, messages, None) == 4 + 2 * sizing.CHAT_MESSAGE_TOKENS + 8
    assert prompt_token_bound("x" * 10_000, None, 512) == 512


def test_tasks_without_a_model_refuse_auto_by_name() -> None:
    from hypha_celery.stages.validation import validate_noop

    with pytest.raises(InvalidTask, match=r"requirements\.memory 'auto'"):
        validate_noop(CFG, (), {"requirements": {"memory": "auto"}})


def test_a_generation_carries_its_kv_cache_apart_and_shares_its_device(llama: Manifest) -> None:
    # Given a generation of 100 KV tokens on the CPU and on a GPU, naming nothing
    cpu = requirements_for_model(CFG, None, llama, holds=never, tokens=100, generation=True)
    gpu = requirements_for_model(CFG, {"gpus": 1}, llama, holds=never, tokens=100, generation=True)
    # Then each carries its KV cache at the device's dtype (also inside its memory), for the ledger's KV budget ...
    assert cpu.kv == 100 * (llama.kv_bytes_per_token_at("float32") or 0) and cpu.memory > cpu.kv
    assert gpu.kv == 100 * (llama.kv_bytes_per_token_at("bfloat16") or 0) and gpu.gpu_memory > gpu.kv
    # ... a fraction of a core ([worker.execution] serving_cpu_cores) and a shared GPU
    assert (cpu.cpu_milli, cpu.gpu_exclusive, gpu.gpu_exclusive) == (100, False, False)
    # ... while what a task names wins, and an inference carries no KV cache
    named = requirements_for_model(CFG, {"cpu_cores": 2, "gpus": 1, "gpu_exclusive": True}, llama, holds=never,
                                   tokens=100, generation=True)
    assert (named.cpu_milli, named.gpu_exclusive) == (2000, True)
    assert requirements_for_model(CFG, None, llama, holds=never, tokens=100).kv == 0


def test_training_keeps_whole_cores_and_the_nodes_gpu_sharing(llama: Manifest) -> None:
    from hypha_celery.stages.sizing import Training

    req = requirements_for_model(CFG, {"gpus": 1}, llama, holds=never, training=Training())
    assert (req.cpu_milli, req.gpu_exclusive, req.kv) == (1000, None, 0)
    cfg = parse_config({"worker": {"execution": {"serving_cpu_cores": 0.25}}})
    assert requirements_for_model(cfg, None, llama, holds=never).cpu_milli == 250

"""Checkable generations (step 17 ``proofs``): proof bytes per 32 tokens and verify time / generation time.

In process on the tiny Llama (float32, CPU, one thread): 8 prompts of 64 greedy tokens each
generated alone with ``proof=True``, then each replayed by :func:`~hypha_celery.runtimes.transformers_proofs.verify`
(one prefill). :func:`cross_device` is the GPU check (``python -m bench.gpu --only proofs``): the
proofs made on ``cuda`` in bf16, verified on the CPU in float32.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["bench_proofs", "cross_device"]

PROMPTS = ["Once upon a time", "The cat sat on the", "In a distant land", "A long time ago",
           "The weather today is", "My favourite food is", "The river flowed past", "She opened the door and"]
NEW_TOKENS = 64


def _store(root: Path) -> Any:
    from hypha_celery.models.examples import TINY_LLAMA, write_tiny_llama
    from hypha_celery.models.store import ModelStore

    store = ModelStore(root / "store")
    folder = root / TINY_LLAMA
    folder.mkdir()
    write_tiny_llama(folder)
    store.add("transformers", folder, TINY_LLAMA)
    return store


def _generate(model: Any, prompt: str) -> tuple[Any, float]:
    from hypha_celery.runtimes import transformers_generation
    from hypha_celery.stages.validation import GenerateParams
    from hypha_celery.work import Generate, Prompt

    request = Generate(model=model.manifest.id, prompts=[Prompt(prompt=prompt)], progress_interval=60.0,
                       params=GenerateParams(max_new_tokens=NEW_TOKENS, proof=True).to_json())
    started = time.perf_counter()
    [out] = transformers_generation.generate(model, request, lambda _update: None).outputs
    return out, time.perf_counter() - started


def _verify(model: Any, prompt: str, proof: dict[str, Any]) -> tuple[dict[str, Any], float]:
    from hypha_celery.runtimes import transformers_proofs

    started = time.perf_counter()
    check = transformers_proofs.verify(model, {"prompt": prompt, "proof": proof})
    return check, time.perf_counter() - started


def bench_proofs() -> None:
    import base64

    import torch

    from bench.common import record, say
    from hypha_celery.models.examples import TINY_LLAMA
    from hypha_celery.runtimes import transformers_loading

    say("\n17. checkable generations: proof bytes per 32 tokens, verify time / generation time (tiny Llama, CPU)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hypha-bench-proofs-") as tmp:
        model = transformers_loading.load(_store(Path(tmp)).open(TINY_LLAMA), "cpu")[0]
        _generate(model, PROMPTS[0])  # warm: first-call costs are not the proof's
        ratios, sizes, accepted = [], [], 0
        for prompt in PROMPTS:
            out, generate_s = _generate(model, prompt)
            check, verify_s = _verify(model, prompt, out.proof)
            accepted += check["accepted"]
            ratios.append(verify_s / generate_s)
            sizes.append(len(base64.b64decode(out.proof["commitments"])) * 32 / len(out.proof["tokens"]))
    ratio = statistics.median(ratios)
    say(f"    {len(PROMPTS)} generations of {NEW_TOKENS} tokens: {statistics.median(sizes):.0f} proof bytes per 32 "
        f"tokens (TOPLOC: 258), verify / generate median {ratio:.3f}, accepted {accepted}/{len(PROMPTS)}")
    record("proof_bytes_per_32", ratio=statistics.median(sizes), target="<= 258", met=max(sizes) <= 258,
           unit="commitment bytes per 32 generated tokens (token ids not counted)")
    record("proof_verify_cost", ratio=ratio, target="<= 0.2", met=ratio <= 0.2 and accepted == len(PROMPTS),
           unit="verify time / generation time, one prefill vs 64 decode steps", accepted=accepted,
           ratios=ratios)


def cross_device(say: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate with proofs on ``cuda`` in bf16, verify on the CPU in float32; ``{}`` and a line without a GPU."""
    import torch

    from hypha_celery.models.examples import TINY_LLAMA
    from hypha_celery.runtimes import transformers_loading

    if not torch.cuda.is_available():
        say("    proofs across devices: no GPU (torch.cuda.is_available() is False): nothing measured")
        return {}
    with tempfile.TemporaryDirectory(prefix="hypha-bench-proofs-") as tmp:
        store = _store(Path(tmp))
        prover = transformers_loading.load(store.open(TINY_LLAMA), "cuda:0", dtype="bfloat16")[0]
        verifier = transformers_loading.load(store.open(TINY_LLAMA), "cpu", dtype="float32")[0]
        checks = []
        for prompt in PROMPTS:
            out, _ = _generate(prover, prompt)
            check, _ = _verify(verifier, prompt, out.proof)
            checks.append(check)
            say(f"    cuda bf16 -> cpu float32  {'accept' if check['accepted'] else 'REJECT'}  {prompt!r}: "
                f"{check['reason']}; {check['stats']}")
    accepted = sum(c["accepted"] for c in checks)
    say(f"    proofs across devices: {accepted}/{len(checks)} accepted")
    return {"gpu_proof_cross_device": {"ratio": accepted / len(checks), "target": "1.0", "met": accepted == len(checks),
                                       "unit": "share of cuda-bf16 proofs accepted by a cpu-float32 verifier",
                                       "stats": [c["stats"] for c in checks]}}

"""Continuous batching against today's static batching, in one process on the tiny Llama (issue 27).

``python -m bench.serving [--device cpu|cuda]`` prints, from one run, three ratios:

- ``mixed_ratio``: completion tokens/s of 12 concurrent mixed requests through the
  continuous engine (:mod:`hypha_celery.serving`) over the same 12 run one after another;
- ``continuous_vs_static``: 32 mixed requests through the engine over today's path
  (``transformers_runtime.generate``: requests grouped by identical settings as
  ``executor/pool.py`` groups them, each group one padded batch until its longest row
  ends, a seeded one alone); ``vs_one_batch`` is the same over static batching's best
  case, all 32 in one greedy padded batch running to the longest;
- ``--transformers-cb``: transformers' own continuous batching (paged cache) on the 12,
  greedy (it has no per-row seed, repetition penalty or stop strings), against this engine;
- ``hol_ratio``: the latency of an 8-token request sent while a 240-token one decodes,
  over its latency alone (static batching would make it wait for the long one: printed too);
- ``prefix_ttft_ratio``: the median time to first token of 8 requests sharing a 200-token
  system prompt (short distinct suffixes, added together) with the prefix cache warm over
  without a cache; ``prefix_cold_ttft_ratio`` the same with the cache empty at the start
  (the first computes the shared blocks, the others wait for it and reuse them).

Targets (README, "Continuous batching"): hol_ratio <= 3, mixed_ratio >= 2, continuous_vs_static >= 5 on a GPU;
prefix_ttft_ratio is reported (lower is better).
Every figure is a ratio of two things measured in the same run, so a busy machine moves both sides.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main"]

TEXTS = ("hello there", "the quick brown fox", "a", "one two three four five", "why not", "it was the best of times")
LENGTHS = (8, 16, 32, 64, 128, 240)
MODEL = "tiny-llama"


@dataclass(frozen=True)
class Spec:
    """One benchmark request, in both engines' terms."""

    text: str
    max_new_tokens: int
    settings: dict[str, Any]
    stop: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        """The validated-params JSON that today's path takes (GenerateParams.to_json's keys)."""
        base = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0,
                "seed": None}
        return {**base, **self.settings, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
                "proof": False}


# Four kinds of request a server sees at once: greedy, penalised greedy, seeded sampled, greedy with a stop string.
SETTINGS: tuple[tuple[dict[str, Any], tuple[str, ...]], ...] = (
    ({}, ()),
    ({"repetition_penalty": 1.2}, ()),
    ({"do_sample": True, "temperature": 0.8, "top_p": 0.9}, ()),
    ({}, ("\n\n",)),
)


def mixed(count: int) -> list[Spec]:
    """``count`` requests cycling through texts, lengths and settings; sampled ones get their own seed."""
    specs = []
    cycle = zip(itertools.cycle(TEXTS), itertools.cycle(LENGTHS), itertools.cycle(SETTINGS), range(count))
    for text, length, (settings, stop), index in cycle:
        if settings.get("do_sample"):
            settings = {**settings, "seed": index}
        specs.append(Spec(text, length, settings, stop))
    return specs


def build(device: str) -> Any:
    """The tiny Llama imported into a store and loaded as a worker loads it (positions for 240 new tokens)."""
    from hypha_celery.models.examples import write_tiny_llama
    from hypha_celery.models.store import ModelStore
    from hypha_celery.runtimes import transformers as transformers_runtime

    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    folder = root / MODEL
    folder.mkdir()
    write_tiny_llama(folder, positions=512)
    store = ModelStore(root / "store")
    store.add("transformers", folder, MODEL)
    return transformers_runtime.load(store.open(MODEL), device)[0]


def _sync(model: Any) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def continuous(model: Any, specs: list[Spec]) -> tuple[int, float]:
    """All ``specs`` added at once to one engine, run to the end: (completion tokens, seconds)."""
    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Request, Sampling

    engine = Engine(model.module, model.tokenizer)
    started = time.perf_counter()
    handles = [engine.add(Request(model.tokenizer(s.text)["input_ids"], s.max_new_tokens, Sampling(**s.settings),
                                  stop=s.stop)) for s in specs]
    engine.run()
    _sync(model)
    return sum(len(h.tokens) for h in handles), time.perf_counter() - started


def static(model: Any, groups: list[list[Spec]], params: list[dict[str, Any]] | None = None) -> tuple[int, float]:
    """Today's path: each group one ``transformers_runtime.generate`` call (a padded batch until its longest ends)."""
    from hypha_celery.runtimes import transformers as transformers_runtime
    from hypha_celery.work import Generate, Prompt

    tokens = 0
    started = time.perf_counter()
    for index, group in enumerate(groups):
        request = Generate(model=MODEL, prompts=[Prompt(prompt=s.text) for s in group],
                           params=params[index] if params else group[0].params(), progress_interval=1e9)
        for out in transformers_runtime.generate(model, request, lambda update: None).outputs:
            if isinstance(out, Exception):
                raise out
            tokens += out.completion_tokens
    _sync(model)
    return tokens, time.perf_counter() - started


def grouped(specs: list[Spec]) -> list[list[Spec]]:
    """The batches executor/pool.py forms: identical params together, a seeded sampled request alone."""
    groups: dict[str, list[Spec]] = {}
    for index, spec in enumerate(specs):
        key = f"alone-{index}" if spec.settings.get("seed") is not None else repr(sorted(spec.params().items()))
        groups.setdefault(key, []).append(spec)
    return list(groups.values())


def latency(model: Any, short: Spec, long: Spec | None, head_start: int) -> float:
    """Seconds from adding ``short`` to its end, with ``long`` decoding ``head_start`` steps ahead (or alone)."""
    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Request

    engine = Engine(model.module, model.tokenizer)
    if long is not None:
        engine.add(Request(model.tokenizer(long.text)["input_ids"], long.max_new_tokens))
        for _ in range(head_start):
            engine.step()
    started = time.perf_counter()
    handle = engine.add(Request(model.tokenizer(short.text)["input_ids"], short.max_new_tokens))
    while not handle.done:
        engine.step()
    _sync(model)
    return time.perf_counter() - started


SUFFIXES = ("hello there", "why", "the quick brown fox", "one two three", "a", "why not", "it was the best",
            "five six seven")


def system_prompt(model: Any, tokens: int = 200) -> list[int]:
    """A made-up system prompt of exactly ``tokens`` token ids."""
    prompt: list[int] = []
    for text in itertools.cycle(TEXTS):
        prompt += model.tokenizer(text + ".")["input_ids"]
        if len(prompt) >= tokens:
            return prompt[:tokens]
    raise AssertionError("unreachable")


def first_token_seconds(model: Any, prompts: list[list[int]], cache_bytes: int, earlier: list[int] | None) -> float:
    """Median seconds from adding ``prompts`` together to each one's first token (a fresh engine, on which
    an ``earlier`` prompt, if any, ran first, untimed: a server that has seen the system prompt before)."""
    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Request

    engine = Engine(model.module, model.tokenizer, prefix_cache_bytes=cache_bytes)
    if earlier is not None:
        engine.add(Request(earlier, 1))
        engine.run()
    started = time.perf_counter()
    handles = [engine.add(Request(p, 8)) for p in prompts]
    first: dict[int, float] = {}
    while len(first) < len(handles):
        engine.step()
        _sync(model)
        now = time.perf_counter() - started
        first.update({h.id: now for h in handles if h.tokens and h.id not in first})
    engine.run()
    return sorted(first.values())[len(first) // 2]


def prefix_ttft(model: Any, repeats: int = 3) -> dict[str, float]:
    """Time to first token of 8 requests sharing a 200-token system prompt, with and without the prefix cache."""
    from hypha_celery.serving.request import kv_bytes_per_token

    system = system_prompt(model)
    prompts = [system + list(model.tokenizer(s)["input_ids"]) for s in SUFFIXES]
    cache_bytes = 64 * kv_bytes_per_token(model.module.config, model.module.dtype.itemsize) * 512

    def median(cache: int, earlier: list[int] | None) -> float:
        return sorted(first_token_seconds(model, prompts, cache, earlier) for _ in range(repeats))[repeats // 2]

    without, warmed, cold = median(0, None), median(cache_bytes, system), median(cache_bytes, None)
    return {"ttft_no_cache_s": without, "ttft_prefix_warm_s": warmed, "ttft_prefix_cold_s": cold,
            "prefix_ttft_ratio": warmed / without, "prefix_cold_ttft_ratio": cold / without}


def transformers_cb(model: Any, specs: list[Spec], attention: str) -> tuple[int, float, int]:
    """transformers' own continuous batching (``init_continuous_batching``, paged cache, its background thread)
    on ``specs`` run greedy: (completion tokens, seconds, rows token-identical to our engine's greedy rows)."""
    from transformers import GenerationConfig

    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Request

    prompts = [list(model.tokenizer(s.text)["input_ids"]) for s in specs]
    ours = Engine(model.module, model.tokenizer)
    handles = [ours.add(Request(p, s.max_new_tokens)) for p, s in zip(prompts, specs, strict=True)]
    ours.run()
    module = model.module
    previous = module.config._attn_implementation
    module.set_attn_implementation(attention)
    config = GenerationConfig(max_new_tokens=max(s.max_new_tokens for s in specs), do_sample=False,
                              eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.tokenizer.pad_token_id)
    manager = module.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        started = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=s.max_new_tokens) for p, s in zip(prompts, specs, strict=True)]
        results: dict[str, Any] = {}
        while len(results) < len(ids):
            out = manager.get_result(timeout=120)
            if out is None:
                raise TimeoutError("transformers' continuous batching returned nothing for 120 s")
            if out.is_finished():
                results[out.request_id] = out
        _sync(model)
        seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True)
        module.destroy_cached_continuous_batching_manager()
        module.set_attn_implementation(previous)
    same = sum(list(results[i].generated_tokens) == h.tokens for i, h in zip(ids, handles, strict=True))
    return sum(len(r.generated_tokens) for r in results.values()), seconds, same


def identical_to_generate(model: Any, specs: list[Spec]) -> int:
    """How many of ``specs``, run greedy through one engine together, are token-identical to ``generate`` alone."""
    import torch

    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Request

    prompts = [list(model.tokenizer(s.text)["input_ids"]) for s in specs]
    engine = Engine(model.module, model.tokenizer)
    handles = [engine.add(Request(p, s.max_new_tokens)) for p, s in zip(prompts, specs, strict=True)]
    engine.run()
    same = 0
    with torch.inference_mode():
        for prompt, spec, handle in zip(prompts, specs, handles, strict=True):
            ids = torch.tensor([prompt], device=model.device)
            out = model.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec.max_new_tokens,
                                        do_sample=False)
            same += out[0, len(prompt):].tolist() == handle.tokens
    return same


def median_latency(model: Any, short: Spec, long: Spec | None, head_start: int, repeats: int = 3) -> float:
    return sorted(latency(model, short, long, head_start) for _ in range(repeats))[repeats // 2]


def rate(result: tuple[int, float]) -> float:
    return result[0] / result[1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    parser.add_argument("--transformers-cb", action="store_true",
                        help="also time transformers' own continuous batching on the 12 requests, greedy")
    parser.add_argument("--prefix-only", action="store_true", help="only the prefix reuse figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.device)
    if args.prefix_only:
        prefix_ttft(model, repeats=1)  # warm-up: the first forwards of a process are slower
        figures = prefix_ttft(model)
        for name, value in figures.items():
            print(f"  {name:24s} {value:10.3f}")
        return figures
    warm = mixed(4)
    continuous(model, warm)
    static(model, grouped(warm))

    twelve = mixed(12)
    cont12, seq12 = continuous(model, twelve), static(model, [[s] for s in twelve])
    thirty_two = mixed(32)
    cont32, stat32 = continuous(model, thirty_two), static(model, grouped(thirty_two))
    longest = max(s.max_new_tokens for s in thirty_two)
    # the padded batch runs every row to the longest; only each row's own max_new_tokens count as served
    one_batch = (sum(s.max_new_tokens for s in thirty_two),
                 static(model, [thirty_two], [Spec("", longest, {}).params()])[1])
    short, long = Spec(TEXTS[0], 8, {}), Spec(TEXTS[3], 240, {})
    alone = median_latency(model, short, None, 0)
    shared = median_latency(model, short, long, 20)
    long_static = static(model, [[long]])[1]
    short_static = static(model, [[short]])[1]
    figures = {
        "continuous_12_tok_s": rate(cont12), "sequential_12_tok_s": rate(seq12), "mixed_ratio": rate(cont12) / rate(seq12),
        "continuous_32_tok_s": rate(cont32), "static_32_tok_s": rate(stat32),
        "continuous_vs_static": rate(cont32) / rate(stat32), "one_batch_32_tok_s": rate(one_batch),
        "vs_one_batch": rate(cont32) / rate(one_batch), "short_alone_s": alone, "short_beside_long_s": shared,
        "hol_ratio": shared / alone,
        "static_hol_ratio": (long_static * (1 - 20 / 240) + short_static) / short_static,
        "greedy_identical_of_12": identical_to_generate(model, twelve),
        **prefix_ttft(model),
    }
    if args.transformers_cb:
        for attention in ("sdpa", "eager"):
            greedy = [Spec(s.text, s.max_new_tokens, {}) for s in twelve]
            try:
                tokens, seconds, same = transformers_cb(model, greedy, attention)
            except Exception as exc:  # its API moves between releases: say so, keep our figures
                print(f"transformers' continuous batching ({attention}) failed: {type(exc).__name__}: {exc}")
                continue
            ours = continuous(model, greedy)
            figures[f"hf_cb_{attention}_12_tok_s"] = tokens / seconds
            figures[f"ours_greedy_12_tok_s_{attention}"] = rate(ours)
            figures[f"hf_cb_{attention}_identical_of_12"] = same
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"serving bench on {args.device} ({args.threads} thread(s), load average {load:.1f}); "
          f"static batches for 32: {len(grouped(thirty_two))}")
    for name, value in figures.items():
        print(f"  {name:24s} {value:10.3f}")
    return figures


if __name__ == "__main__":
    main()

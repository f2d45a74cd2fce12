"""Structured output on the tiny Llama, in one process: what the grammar costs, and whether every output is valid.

``python -m bench.structured`` (the ``structured_output`` step of ``make bench``) prints two figures:

- ``structured_tokens_ratio``: decode tokens/s (after the first token: the task's own ``tokens_per_s``) of sampled
  generations constrained to a JSON Schema over the same generations unconstrained (transformers' ``generate``,
  one request at a time, the static path's per-row mask included), target >= 0.8. The wall-clock ratio is printed
  beside it: it also holds the grammar's compile and the prefill, spread over fewer tokens (a constrained row
  ends when its JSON does);
- ``structured_valid_rate``: the share of outputs over :data:`CORPUS` (every schema, greedy and several seeds, through both
  generation paths: transformers' ``generate`` and the continuous-batching engine) that ``jsonschema`` accepts,
  target 1.0. The tiny Llama's weights are random: only the constraint makes its output valid.

:data:`CORPUS` is also what ``tests/unit/test_structured_output.py`` runs.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CORPUS", "bench_structured_output", "main", "run"]

_NAME = {"type": "string", "maxLength": 10}
# Bounded where a random model could otherwise go on forever: strings (maxLength or a pattern), arrays (maxItems),
# a number's digits (multipleOf: without it the grammar allows any number of fraction digits, and random weights
# take them until max_new_tokens runs out: InvalidOutput, never SUCCESS); free whitespace is never allowed
# (structured.response_format.grammar_options).
CORPUS: dict[str, dict[str, Any]] = {
    "flat": {"type": "object", "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0,
             "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "name": _NAME}, "required": ["id", "name"],
                 "additionalProperties": False},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                 "additionalProperties": False}},
        "required": ["user", "meta"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                              "size": {"enum": ["S", "M", "L", 42, None]}},
             "required": ["colour", "size"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]},
                                                               "minItems": 2, "maxItems": 4}},
                     "required": ["tags"], "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.01},
        "count": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}},
        "required": ["score", "count"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "note": _NAME, "flag": {"type": "boolean"}},
                 "required": ["id"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                                 "slug": {"type": "string", "pattern": "^[a-z]{2,6}$"}},
                "required": ["code", "slug"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[0-9]{4}$"},
                                                   "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                  "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                                    {"type": "boolean"}]}},
               "required": ["value"], "additionalProperties": False},
}
PROMPT = "A record as JSON:"
MAX_NEW_TOKENS = 160
SEEDS = (None, 1, 2, 3)  # None: greedy


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _params(seed: int | None, max_new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "do_sample": seed is not None, "temperature": 1.0, "top_p": 1.0,
            "top_k": 0, "repetition_penalty": 1.0, "seed": seed, "stop": [], "proof": False}


def load(root: Path) -> Any:
    """The tiny Llama, loaded on the CPU from a store under ``root``."""
    from hypha_celery.models.examples import TINY_LLAMA, tiny_llama_store
    from hypha_celery.runtimes import transformers as transformers_runtime

    return transformers_runtime.load(tiny_llama_store(root).open(TINY_LLAMA), "cpu")[0]


def static_generation(model: Any, formats: list[dict[str, Any] | None], seed: int | None,
                      max_new_tokens: int = MAX_NEW_TOKENS) -> Any:
    """One static batch (transformers' ``generate``) of :data:`PROMPT`, one row per format: its ``Generation``."""
    from hypha_celery.runtimes.transformers_generation import generate
    from hypha_celery.work import Generate, Prompt

    job = Generate(model="tiny-llama", params=_params(seed, max_new_tokens),
                   prompts=[Prompt(prompt=PROMPT, response_format=f) for f in formats], progress_interval=3600)
    return generate(model, job, lambda update: None)


def static(model: Any, formats: list[dict[str, Any] | None], seed: int | None,
           max_new_tokens: int = MAX_NEW_TOKENS) -> list[Any]:
    """:func:`static_generation`'s outputs."""
    return list(static_generation(model, formats, seed, max_new_tokens).outputs)


def engine(model: Any, formats: list[dict[str, Any] | None], seed: int | None,
           max_new_tokens: int = MAX_NEW_TOKENS) -> list[Any]:
    """The same rows through the continuous-batching engine, each with its own constraint; their handles."""
    from hypha_celery.runtimes.transformers_generation import constraint_for
    from hypha_celery.serving.engine import Engine
    from hypha_celery.serving.request import Request, Sampling

    eng = Engine(model.module, model.tokenizer)
    prompt = list(model.tokenizer(PROMPT)["input_ids"])
    sampling = Sampling(do_sample=seed is not None, top_k=0, seed=seed)
    handles = [eng.add(Request(prompt, max_new_tokens, sampling, constraint=constraint_for(model, f)))
               for f in formats]
    eng.run()
    return handles


def valid(text: str, schema: dict[str, Any]) -> bool:
    from hypha_celery.errors import InvalidOutput
    from hypha_celery.structured.response_format import check_output

    try:
        check_output(text, response_format("x", schema))
    except InvalidOutput:
        return False
    return True


def run(say: Callable[[str], None] = print, repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Both figures, printed; returned as ``{name: {"ratio", "target", "met", ...}}``."""
    import statistics

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        model = load(Path(root))
        total = good = 0
        for seed in SEEDS:
            formats = [response_format(name, schema) for name, schema in CORPUS.items()]
            texts = [o.text for o in static(model, formats, seed)] + [h.text for h in engine(model, formats, seed)]
            for text, schema in zip(texts, list(CORPUS.values()) * 2, strict=True):
                total += 1
                good += valid(text, schema)
        rate = good / total
        say(f"    valid outputs over the corpus ({len(CORPUS)} schemas x {len(SEEDS)} settings x 2 paths): "
            f"{good}/{total}")
        fmt = response_format("flat", CORPUS["flat"])

        def rates() -> dict[str, tuple[float, float]]:
            """Per format (plain, constrained): decode tokens/s (after the first token, as the task's
            ``tokens_per_s``) and wall tokens/s; the two alternate, so a busy machine slows both alike."""
            sums = {name: [0, 0, 0.0, 0.0] for name in ("plain", "constrained")}  # tokens, decoded, decode_s, wall_s
            for seed in range(12):
                for name, each in (("plain", None), ("constrained", fmt)):
                    started = time.perf_counter()
                    generation = static_generation(model, [each], seed + 1, 48)
                    count = sum(o.completion_tokens for o in generation.outputs)
                    row = sums[name]
                    row[0] += count
                    row[1] += count - 1
                    row[2] += generation.compute_s - generation.time_to_first_token_s
                    row[3] += time.perf_counter() - started
            return {name: (row[1] / row[2], row[0] / row[3]) for name, row in sums.items()}

        ratios = []
        for _ in range(repeats):
            measured = rates()
            (plain, plain_wall), (constrained, constrained_wall) = measured["plain"], measured["constrained"]
            ratios.append(constrained / plain)
            say(f"    decode tokens/s unconstrained {plain:.0f}, constrained {constrained:.0f}: {constrained / plain:.3f}"
                f"  (wall, the grammar's compile and prefill included: {plain_wall:.0f}, {constrained_wall:.0f}: "
                f"{constrained_wall / plain_wall:.3f}; a constrained row ends at its JSON's end, sooner)")
        ratio = statistics.median(ratios)
    return {"structured_valid_rate": {"ratio": rate, "target": ">= 1.0 (100%)", "met": rate >= 1.0},
            "structured_tokens_ratio": {"ratio": ratio, "target": ">= 0.8", "met": ratio >= 0.8}}


def bench_structured_output() -> None:
    """``make bench`` step 20: both figures, recorded."""
    from bench.common import REPEATS, record, say

    say("\n19. structured output: constrained tokens/s / unconstrained, valid outputs over the schema corpus "
        "(tiny Llama, CPU)")
    for name, figure in run(say, REPEATS).items():
        unit = "valid / all" if name == "structured_valid_rate" else "tokens/s / tokens/s"
        record(name, unit=unit, **figure)


def main() -> None:
    print("structured output (tiny Llama, CPU)")
    for name, figure in run().items():
        print(f"    {name:24} {figure['ratio']:.3f}  target {figure['target']}  {'met' if figure['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()

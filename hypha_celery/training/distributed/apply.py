"""DiLoCo's outer step inside a job executor: the fetched deltas checked, combined and applied, file by file.

The worker (:mod:`.outer`) checks the reports, fetches each delta (its sha256 checked) and the last
round's momentum into a scratch folder, and sends an :class:`~hypha_celery.work.OuterStep`; the executor
(:mod:`hypha_celery.executor.child`) runs :func:`run` under the lease's memory cap, so a step too large
for its reservation fails there with ``MemoryLimitExceeded`` and the worker serves on.

:func:`judge` refuses a delta whose metadata, encoding, names, shapes or values are wrong
(:func:`.deltas.scan_delta`) or whose norm is out of the round's bounds. :func:`run` then reads the base
(:class:`.weights.Weights`: ``model.safetensors``, a sharded model's index and shards, or a LoRA adapter's
file), every accepted delta and the momentum one tensor at a time, in the base's file order, and writes
the next version's weight files one at a time in the base's layout and dtypes (a shard holds its own
tensors only: the peak is one weight file of output plus one tensor of each input). The momentum is
written beside the deltas, one float32 file per base weight file, for the worker to upload. The new
version enters the store as the base's files with the new weights (a LoRA adapter: an adapter of the
same base). Round 0 of a LoRA job stores the job's first adapter instead (:func:`fresh_adapter`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypha_celery.errors import DeltaRejected, UnsupportedModel
from hypha_celery.manifest import ADAPTER_CONFIG
from hypha_celery.models.store import Entry, ModelStore
from hypha_celery.training.distributed.weights import Weights
from hypha_celery.work import OuterStep

__all__ = ["Judged", "judge", "run"]

log = logging.getLogger(__name__)


@dataclass
class Judged:
    """The deltas after the checks: the accepted (index, norm) and the refused (index, reason)."""

    accepted: list[tuple[int, float]] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    median_norm: float | None = None


def judge(deltas: Sequence[tuple[Path, str]], shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, str],
          base_norm: float, *, max_delta_norm_ratio: float | None, max_base_norm_ratio: float | None,
          order: Sequence[str] | None = None) -> Judged:
    """Scan each ``(path, what)`` (:func:`.deltas.scan_delta`), then refuse the norms out of bounds: above
    ``max_delta_norm_ratio`` x the lower median norm of the finite ones (of two, the smaller bounds the larger),
    or above ``max_base_norm_ratio`` x ``base_norm`` (``None``: no bound; a median or base norm of 0 sets none)."""
    from hypha_celery.training.distributed.deltas import scan_delta

    out = Judged()
    finite: list[tuple[int, float]] = []
    for index, (path, what) in enumerate(deltas):
        try:
            finite.append((index, scan_delta(path, shapes, expected, what, order=order)))
        except DeltaRejected as exc:
            out.refused.append((index, str(exc)))
    if finite:
        norms = sorted(norm for _, norm in finite)
        out.median_norm = norms[(len(norms) - 1) // 2]
    for index, norm in finite:
        what = deltas[index][1]
        if max_delta_norm_ratio is not None and out.median_norm and norm > max_delta_norm_ratio * out.median_norm:
            out.refused.append((index, f"{what}: its L2 norm {norm:.4g} is above max_delta_norm_ratio "
                                       f"({max_delta_norm_ratio:g}) x the round's lower median norm "
                                       f"({out.median_norm:.4g}); refused"))
        elif max_base_norm_ratio is not None and base_norm and norm > max_base_norm_ratio * base_norm:
            out.refused.append((index, f"{what}: its L2 norm {norm:.4g} is above max_base_norm_ratio "
                                       f"({max_base_norm_ratio:g}) x the base's norm ({base_norm:.4g}); refused"))
        else:
            out.accepted.append((index, norm))
    return out


def run(store: ModelStore, request: OuterStep, tmpdir: Path) -> dict[str, Any]:
    """The outer step ``request`` asks (or round 0's fresh adapter); the :class:`~hypha_celery.protocol.Stepped`
    fields, less its usage. ``tmpdir``: the executor's own scratch, where the next version is assembled."""
    scratch = Path(request.scratch)
    entry = store.open(request.base)
    if request.init_lora is not None:
        return _fresh_version(store, request, entry, tmpdir)
    with Weights.of(entry) as base:
        order = list(base.names())
        base_norm = base.norm()
        judged = judge([(Path(d["path"]), str(d["what"])) for d in request.deltas], base.shapes, request.expected,
                       base_norm, max_delta_norm_ratio=request.max_delta_norm_ratio,
                       max_base_norm_ratio=request.max_base_norm_ratio, order=order)
        if len(judged.accepted) < request.min_workers:
            reasons = "; ".join(reason for _, reason in judged.refused) or "none refused"
            raise DeltaRejected(f"job {request.job} round {request.round}: {len(judged.accepted)} delta(s) passed the "
                                f"checks, fewer than min_workers ({request.min_workers}): {reasons}")
        accepted = sorted(judged.accepted)
        paths = [Path(request.deltas[index]["path"]) for index, _ in accepted]
        weights = [int(request.deltas[index]["weight"]) for index, _ in accepted]
        folder = tmpdir / f"next-{request.next_id}"
        folder.mkdir()
        momentum = _step(base, paths, weights, request, folder, scratch, order)
        sha256 = _publish(store, request, entry, folder) if request.publish else None
        shutil.rmtree(folder, ignore_errors=True)
    return {"accepted": [index for index, _ in accepted], "norms": [norm for _, norm in accepted],
            "refused": [{"index": index, "reason": reason} for index, reason in judged.refused],
            "median_norm": judged.median_norm, "base_norm": base_norm, "sha256": sha256, "momentum": momentum}


def _step(base: Weights, paths: Sequence[Path], weights: Sequence[int], request: OuterStep, folder: Path,
          scratch: Path, order: Sequence[str]) -> dict[str, str]:
    """Combine and apply, one base weight file at a time: its new weights into ``folder``, its momentum into
    ``scratch``; returns the momentum files by base weight file."""
    import numpy as np

    from hypha_celery.training.distributed.compression import decoded
    from hypha_celery.training.distributed.deltas import combine_stack, nesterov, save_tensors

    momentum_files: dict[str, str] = {}
    with ExitStack() as stack:
        readers = [stack.enter_context(decoded(path, base.shapes, f"delta {path.name}", order)) for path in paths]
        previous = _previous(stack, base, request)
        for file, tensors in base.files.items():
            new, velocity = {}, {}
            for name in tensors:
                rows = [next(reader) for reader in readers]
                if any(row_name != name for row_name, _ in rows):
                    raise DeltaRejected(f"job {request.job} round {request.round}: a delta's tensors are out of the "
                                        f"base's order at {name}; refused")
                average = combine_stack(np.stack([tensor.astype(np.float64) for _, tensor in rows]), weights,
                                        request.aggregator, request.trim)
                before = None if previous is None else {name: previous.tensor(name)}
                step, moment = nesterov({name: base.tensor(name)}, {name: average}, before, lr=request.lr,
                                        momentum=request.momentum)
                new[name], velocity[name] = step[name], moment[name]
            save_tensors(new, folder / file, request.expected)
            out = scratch / f"momentum-{file}"
            save_tensors(velocity, out, request.expected)
            momentum_files[file] = str(out)
            del new, velocity
    return momentum_files


def _previous(stack: ExitStack, base: Weights, request: OuterStep) -> Weights | None:
    """The last round's momentum, checked against the base: the same files, names and shapes, float32."""
    if request.momentum_in is None:
        return None
    if set(request.momentum_in) != set(base.files):
        raise DeltaRejected(f"job {request.job}'s momentum files are not the base's weight files; refused")
    paths = {file: Path(path) for file, path in request.momentum_in.items()}
    folders = {path.parent for path in paths.values()}
    if len(folders) != 1:
        raise DeltaRejected(f"job {request.job}'s momentum files are not in one folder; refused")
    links = {file: path.name for file, path in paths.items()}
    try:
        momentum = Weights.read(folders.pop(), sorted(links.values()), f"job {request.job}'s momentum")
    except UnsupportedModel as exc:
        raise DeltaRejected(str(exc)) from None
    stack.enter_context(momentum)
    for file, tensors in base.files.items():
        held = momentum.files.get(links[file], [])
        if held != tensors or any(momentum.shapes[name] != base.shapes[name] for name in tensors):
            raise DeltaRejected(f"job {request.job}'s momentum for {file} does not match the base's tensors; refused")
    return momentum


def _publish(store: ModelStore, request: OuterStep, base: Entry, folder: Path) -> str:
    """Store ``folder`` (the new weight files) with the base's other files as ``request.next_id``; its manifest sha256."""
    adapter_of = base.manifest.adapter_of
    for name, path in base.files().items():
        if (folder / name).exists() or (adapter_of is not None and name != ADAPTER_CONFIG):
            continue
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / name)  # config, tokenizer, and a sharded model's index as it is
    if adapter_of is not None:
        store.add("transformers", folder, request.next_id, base=adapter_of.id)
    else:
        store.add("transformers", folder, request.next_id, task=base.manifest.task, parent=base.id)
    return store.manifest_sha256(request.next_id)


def _fresh_version(store: ModelStore, request: OuterStep, entry: Entry, tmpdir: Path) -> dict[str, Any]:
    """Round 0 of a LoRA job: a fresh adapter of ``entry`` (``init_lora``, ``seed``) stored as ``next_id``."""
    from hypha_celery.training.finetune.lora import fresh_adapter

    sha256 = None
    if request.publish:
        folder = tmpdir / f"next-{request.next_id}"
        folder.mkdir()
        fresh_adapter(entry, request.init_lora or {}, request.seed, folder)
        store.add("transformers", folder, request.next_id, base=entry)
        shutil.rmtree(folder, ignore_errors=True)
        sha256 = store.manifest_sha256(request.next_id)
    return {"accepted": [], "norms": [], "refused": [], "median_norm": None, "base_norm": 0.0, "sha256": sha256,
            "momentum": {}}


"""What ``make gpu-check`` compares: NVML's GPU memory in use by the worker against the ledger's reservation.

:class:`NvmlMemory` reads the worker's processes' GPU memory, :class:`Sampler` reads the ledger's leases and
NVML together on a thread, and :func:`compare` finds the samples where the memory in use exceeded what the
ledger held. :mod:`hypha_celery.harness.gpu_check` runs them around real generations.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypha_celery.resources.ledger import Ledger

__all__ = ["Comparison", "NvmlMemory", "Sample", "Sampler", "compare"]


# --- NVML while the worker runs ------------------------------------------------------------------------------


class NvmlMemory:
    """GPU memory in use by one process group (the worker's), per GPU, as NVML reports it.

    Per-process figures (``nvmlDeviceGetComputeRunningProcesses``) for the processes in
    the worker's process group; where NVML gives none for them (containers that hide host
    pids, drivers that do not report it), the device's used memory less what was used
    before the worker started.
    """

    PER_PROCESS = "per process"
    DEVICE = "device used minus the baseline before the worker started"

    def __init__(self, indices: Sequence[int]) -> None:
        import pynvml

        pynvml.nvmlInit()  # reference-counted by NVML: list_gpus' own init stays valid
        self.nvml = pynvml
        self.handles = {index: pynvml.nvmlDeviceGetHandleByIndex(index) for index in indices}
        self.baseline = {index: self.device_used(index) for index in indices}
        self.group: int | None = None
        self.why_not_per_process = ""

    def device_used(self, index: int) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handles[index]).used)

    def _ours(self, pid: int) -> bool:
        try:
            return self.group is not None and os.getpgid(pid) == self.group
        except OSError:
            return False

    def _processes(self, index: int) -> list[tuple[int, int | None]] | None:
        try:
            found = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handles[index])
        except Exception as exc:  # NVMLError, or an nvidia-ml-py without the call
            self.why_not_per_process = f"nvmlDeviceGetComputeRunningProcesses failed: {exc}"
            return None
        result: list[tuple[int, int | None]] = []
        for process in found:
            used = getattr(process, "usedGpuMemory", None)
            result.append((int(process.pid), None if used is None or used >= 2**63 else int(used)))
        return result

    def read(self) -> dict[int, tuple[int, str, list[int]]]:
        """Per GPU: bytes in use by the worker's processes, how it was measured, and their pids."""
        out: dict[int, tuple[int, str, list[int]]] = {}
        for index in self.handles:
            processes = self._processes(index)
            if processes is not None:
                ours = [(pid, used) for pid, used in processes if self._ours(pid)]
                if ours and all(used is not None for _, used in ours):
                    out[index] = (sum(used or 0 for _, used in ours), self.PER_PROCESS, [pid for pid, _ in ours])
                    continue
                if ours:
                    self.why_not_per_process = "NVML lists the worker's processes without their memory"
                elif processes:
                    self.why_not_per_process = (f"NVML lists pids {[pid for pid, _ in processes]}, none in the "
                                                "worker's process group (another pid namespace?)")
            out[index] = (max(0, self.device_used(index) - self.baseline[index]), self.DEVICE, [])
        return out


# --- the ledger and NVML, sampled together ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One look at the node: live task ids, GPU bytes the ledger holds, and what NVML sees in use."""

    at: float
    tasks: frozenset[str]
    task_reserved: dict[int, int]  # per GPU: bytes of the live task leases
    cache_reserved: dict[int, int]  # per GPU: bytes the model cache accounts
    in_use: dict[int, int]
    method: dict[int, str]
    pids: dict[int, list[int]]

    def reserved(self, gpu: int) -> int:
        return self.task_reserved.get(gpu, 0) + self.cache_reserved.get(gpu, 0)


def _pairs(flat: Any) -> dict[int, int]:
    """A lease's ``[gpu, bytes, gpu, bytes]`` (Lua's cjson writes an empty one as ``{}``)."""
    if not isinstance(flat, list):
        return {}
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class Sampler:
    """A thread that reads the ledger's leases, then NVML, every ``interval`` seconds."""

    def __init__(self, ledger: Ledger, nvml: NvmlMemory | None, interval: float = 0.02) -> None:
        self.ledger = ledger
        self.nvml = nvml
        self.interval = interval
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-check-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a missed sample is reported, not fatal
                if len(self.errors) < 5:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def sample(self) -> Sample:
        usage = self.ledger.usage()
        tasks: set[str] = set()
        task_reserved: dict[int, int] = {}
        cache_reserved: dict[int, int] = {}
        for lease in usage.leases:
            into = cache_reserved if lease.get("k") == "cache" else task_reserved
            if lease.get("k") != "cache" and lease.get("t"):
                tasks.add(str(lease["t"]))
            for gpu, amount in _pairs(lease.get("g")).items():
                into[gpu] = into.get(gpu, 0) + amount
        seen = self.nvml.read() if self.nvml is not None else {}
        return Sample(
            at=time.monotonic(),
            tasks=frozenset(tasks),
            task_reserved=task_reserved,
            cache_reserved=cache_reserved,
            in_use={gpu: used for gpu, (used, _, _) in seen.items()},
            method={gpu: how for gpu, (_, how, _) in seen.items()},
            pids={gpu: pids for gpu, (_, _, pids) in seen.items()},
        )

    def during(self, task_ids: set[str]) -> list[Sample]:
        """The samples taken while one of ``task_ids`` held a lease."""
        return [s for s in list(self.samples) if s.tasks & task_ids]


@dataclass
class Comparison:
    """NVML's memory in use against the ledger's reservation, over the samples of some tasks."""

    gpu: int
    samples: int = 0
    peak_in_use: int = 0
    task_reserved: int = 0  # what the tasks' leases held at the peak
    cache_reserved: int = 0  # what the model cache accounted at the peak
    worst_ratio: float = 0.0  # max of in use / reserved at the same moment
    over: list[tuple[int, int]] = field(default_factory=list)  # (in use, reserved) where in use > reserved
    methods: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)

    @property
    def exceeded(self) -> bool:
        return bool(self.over)


def compare(samples: list[Sample], gpu: int) -> Comparison:
    result = Comparison(gpu=gpu)
    for sample in samples:
        if gpu not in sample.task_reserved or gpu not in sample.in_use:
            continue
        reserved, used = sample.reserved(gpu), sample.in_use[gpu]
        result.samples += 1
        if result.samples == 1 or used > result.peak_in_use:
            result.peak_in_use = used
            result.task_reserved, result.cache_reserved = sample.task_reserved[gpu], sample.cache_reserved.get(gpu, 0)
        result.methods.add(sample.method[gpu])
        result.pids.update(sample.pids.get(gpu, ()))
        if reserved:
            result.worst_ratio = max(result.worst_ratio, used / reserved)
        if used > reserved:
            result.over.append((used, reserved))
    return result

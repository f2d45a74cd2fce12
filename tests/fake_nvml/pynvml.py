"""A stand-in for nvidia-ml-py's ``pynvml`` that reports GPUs without a driver.

Put ``tests/fake_nvml`` first on ``PYTHONPATH``. ``FAKE_NVML_GPUS`` sets how
many devices (default 2); each is an H200 with 141 GB.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

H200_BYTES = 150_754_820_096
_initialised = False
# Tests set these: per device, its compute processes as (pid, bytes or None) and its memory in use.
processes: dict[int, list[tuple[int, int | None]]] = {}
used: dict[int, int] = {}


class NVMLError(Exception):
    pass


class NVMLError_Uninitialized(NVMLError):
    pass


def nvmlInit() -> None:
    global _initialised
    _initialised = True


def _check() -> None:
    if not _initialised:
        raise NVMLError_Uninitialized("Uninitialized")


def nvmlDeviceGetCount() -> int:
    _check()
    return int(os.environ.get("FAKE_NVML_GPUS", "2"))


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _check()
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return "NVIDIA H200"


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    return SimpleNamespace(total=H200_BYTES, free=H200_BYTES - used.get(handle, 0), used=used.get(handle, 0))


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    _check()
    return [SimpleNamespace(pid=pid, usedGpuMemory=amount) for pid, amount in processes.get(handle, [])]


def nvmlDeviceGetCudaComputeCapability(handle: int) -> tuple[int, int]:
    return (9, 0)


def nvmlDeviceGetUUID(handle: int) -> str:
    return f"GPU-00000000-0000-0000-0000-00000000000{handle}"


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=25 + 10 * handle, memory=5)

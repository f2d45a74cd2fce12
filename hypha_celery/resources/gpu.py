"""GPU discovery and utilisation through NVML, never through CUDA.

NVML reads the driver without creating a CUDA context, so the worker's
parent process can use it before forking pool processes (Celery #3402,
#6036: a CUDA context in the parent breaks forked children). No NVML (no
driver, no GPU) means no GPUs, not an error.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

__all__ = ["CUDA_CONTEXT", "CUDA_HOST_RUNTIME", "GpuInfo", "gpu_utilization", "list_gpus"]

# What one process's CUDA context takes on a device before any tensor: 500-600 MiB
# with torch 2.x and CUDA 12-13 on Hopper, rounded up. A serving executor's context
# is counted with its model cache; a request that loads first counts it itself.
CUDA_CONTEXT = 768 * 2**20
# Host memory the same process's CUDA runtime adds once initialised (driver state, cuBLAS and
# kernel images paged in): an estimate of 1-2 GiB, rounded up; `make gpu-check` prints the
# measured host peak of a first GPU job next to what was reserved.
CUDA_HOST_RUNTIME = 2 * 2**30

log = logging.getLogger(__name__)
# NVML's own state is per process (nvmlInit), so whether this process started it is kept per process too.
_init_lock = threading.Lock()
_initialised = False
_absent = False  # NVML failed to start once: no driver here, do not try (dlopen) on every call


@dataclass(frozen=True)
class GpuInfo:
    index: int
    model: str
    memory: int
    compute_capability: str
    uuid: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _nvml() -> ModuleType | None:
    global _initialised, _absent
    if _absent:
        return None
    try:
        import pynvml
    except ImportError:
        _absent = True
        return None
    with _init_lock:
        if not _initialised:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                log.debug("NVML unavailable: %s", exc)
                _absent = True
                return None
            _initialised = True
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_gpus() -> list[GpuInfo]:
    """Every GPU the driver reports, or ``[]`` when there is no NVML."""
    nvml = _nvml()
    if nvml is None:
        return []
    gpus = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuInfo(
                index=index,
                model=_text(nvml.nvmlDeviceGetName(handle)),
                memory=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                compute_capability=f"{major}.{minor}",
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            ))
    except nvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs: %s", exc)
    return gpus


def gpu_utilization() -> dict[int, float]:
    """Each GPU's utilisation over the driver's last sample period, 0..1."""
    nvml = _nvml()
    if nvml is None:
        return {}
    result = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            rates = nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(index))
            result[index] = rates.gpu / 100.0
    except nvml.NVMLError as exc:
        log.debug("NVML utilisation failed: %s", exc)
    return result
